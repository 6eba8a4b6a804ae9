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


def encode_both(layer_bytes, ref_encode, kernel, dev, view, ids, group=0):
    """Encode blocks ``ids`` of ``view`` with a codec's reference and its kernel (on ``dev``):
    (kernel's bytes, reference's bytes)."""
    _, _, t, h, d = view.shape
    nbytes = layer_bytes(t, h, d, group)
    ids = torch.tensor(ids, dtype=torch.long)
    want = torch.zeros(len(ids), nbytes, dtype=torch.uint8)
    ref_encode(view, ids, want, group)
    got = torch.zeros(len(ids), nbytes, dtype=torch.uint8, device=dev)
    kernel(view.to(dev), ids.to(dev), got, group)
    return got.cpu(), want


def decode_both(codec, kernel, dev, kind, nb, t, h, d, ids, group=0, dtype=torch.bfloat16, poison=None):
    """Encode ``ids`` with the reference (``codec``: (layer_bytes, encode, decode)), decode with
    the reference and with ``kernel`` into fresh caches of layout ``kind``:
    (source view, kernel's raw cache, reference's raw cache, reference's view)."""
    layer_bytes, ref_encode, ref_decode = codec
    _, _, src_view = make_paged(kind, nb, t, h, d, dtype)
    if poison:
        poison(src_view)
    ids = torch.tensor(ids, dtype=torch.long)
    enc = torch.zeros(len(ids), layer_bytes(t, h, d, group), dtype=torch.uint8)
    ref_encode(src_view, ids, enc, group)
    _, raw_want, want = make_paged(kind, nb, t, h, d, dtype, seed=1)
    _, raw_got, _ = make_paged(kind, nb, t, h, d, dtype, seed=1)
    raw_got = raw_got.to(dev)
    got = raw_got.as_strided(want.shape, want.stride(), want.storage_offset())
    ref_decode(enc, want, ids, group)
    kernel(enc.to(dev), got, ids.to(dev), group)
    return src_view, raw_got.cpu(), raw_want, want
