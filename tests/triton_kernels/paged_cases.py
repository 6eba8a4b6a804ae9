"""Paged KV tensors in each physical layout vLLM uses, for the kernel tests."""

from __future__ import annotations

import contextlib
import os

import torch

from kvplug.layout import BlockStrides, KVLayout, paged_view

LAYOUTS = ("2_nb", "nb_2", "cpu_packed", "nb_2_hnd", "gpu_nhd")


def make_paged(kind: str, nb: int, t: int, h: int, d: int, dtype=torch.bfloat16, seed: int = 0):
    """Random paged KV of one layer in layout ``kind``; returns (layout, raw tensor, paged view)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "2_nb":  # FlashAttention: (2, num_blocks, T, H, D)
        kv = torch.randn(2, nb, t, h, d, generator=g)
    elif kind == "nb_2":  # FlashInfer / Triton: (num_blocks, 2, T, H, D)
        kv = torch.randn(nb, 2, t, h, d, generator=g)
    elif kind == "cpu_packed":  # CPU backend: (num_blocks, H, T, 2*D), K and V in the last dim
        kv = torch.randn(nb, h, t, 2 * d, generator=g)
    elif kind == "nb_2_hnd":  # HND physical order: heads before tokens in memory
        kv = torch.randn(nb, 2, h, t, d, generator=g).permute(0, 1, 3, 2, 4)
    elif kind == "gpu_nhd":  # vLLM 0.32's [B, H, N, 2D] view of its default LBNHC layout
        kv = torch.randn(nb, t, h, 2 * d, generator=g).transpose(1, 2)
    else:
        raise ValueError(kind)
    kv = kv.to(dtype)
    layout = KVLayout(1, h, d, t, {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype])
    return layout, kv, paged_view(kv, layout, BlockStrides.plain(t, h, d) if kind == "cpu_packed" else None)


def nan_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values and equal NaN positions (NaN payloads may differ)."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(torch.where(a.isnan(), 0, a), torch.where(b.isnan(), 0, b))


@contextlib.contextmanager
def triton_mode():
    """Import kernels inside this: they run in Triton's CPU interpreter unless
    TRITON_INTERPRET=0 is set (then compiled, on a GPU). Yields their device.

    Triton reads TRITON_INTERPRET when a kernel is defined (and gluon when first
    imported), so it is set only meanwhile: other tests' Triton is untouched.
    """
    prev = os.environ.get("TRITON_INTERPRET")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    interpret = os.environ["TRITON_INTERPRET"] != "0"
    try:
        if interpret:
            import triton.experimental.gluon  # noqa: F401  (checks the flag on import)
        yield "cpu" if interpret else "cuda"
    finally:
        if prev is None:
            del os.environ["TRITON_INTERPRET"]
