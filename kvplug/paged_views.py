"""vLLM's 4-D per-layer KV views, read as kvplug's paged view [num_blocks, 2, T, H, D].

vLLM (0.32) allocates one backing buffer and hands every layer, attention and
connector alike, a 4-D view ``[B, H, N, C]`` (``create_kv_cache_views``):
blocks, head slots, tokens in a block, content. Its physical order is a
``KVCacheLayout`` permutation of ``[L, B, H, N, C]`` (LBNHC by default, also
LBHNC, LHBNC, BLHNC, BLNHC, BHLNC), so the strides, not the shape, say where
things are: when L is not outermost other layers' pages sit between a layer's
blocks, and when H comes before B a block is not even one run of memory.
Reading the view through its own strides covers all six.

What the content axis holds is the backend's choice, announced by its spec
(``connectors/vllm/layout_check.kv_format_of``):
  kv_last    ``[B, H, N, 2D]``, K = ``[..., :D]``, V = ``[..., D:]`` (FlashAttention,
             FlashInfer, Triton, FlexAttention: ``kv.transpose(1, 2).split(D, -1)``)
  kv_planes  ``[B, 2, N, H*D]``, K = ``[:, 0]``, V = ``[:, 1]`` (b12x: ``kv.unbind(1)``,
             heads unflattened from the last dim)
vLLM's CPU backend hands the kv_last shape but orders a block its own way
(``kvplug.layout.BlockStrides``): shapes alone cannot tell them apart, so the
caller says which it holds (``paged_view``'s ``cpu_strides``).

Kernel blocks. A backend that cannot take the manager's block size (e.g.
FlashInfer's 16/32/64-token pages under ``--block-size 128``) gets each manager
block split into ``ratio`` kernel blocks by ``create_kv_cache_views`` itself: the
tensor the connector receives then has ``num_blocks * ratio`` rows of
``block_size / ratio`` tokens, block stride ``page / ratio``, and manager block
``b`` is rows ``b * ratio + j`` (vLLM's kernel block tables say the same). vLLM
splits only dense, layer-compact layouts (LBNHC, LBHNC) and raises for the others.
When a manager block's kernel blocks follow each other along the token axis
(LBNHC, or one head) the tensor is read as manager blocks of ``block_size``
tokens, under the manager's block ids. In LBHNC with several heads each kernel
block holds every head of its tokens, so a block's tokens are no single
strided axis: refused, naming the settings that avoid it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvplug.layout import KVLayout

KV_LAST = "kv_last"
KV_PLANES = "kv_planes"
KV_FORMATS = (KV_LAST, KV_PLANES)


def block_shape_4d(layout: KVLayout, kv_format: str, tokens: int | None = None) -> tuple[int, int, int]:
    """One block of a vLLM 4-D view, ``[H, N, C]``, in ``kv_format`` (``tokens``: kernel block size)."""
    T, H, D = tokens or layout.block_tokens, layout.num_kv_heads, layout.head_size
    return (H, T, 2 * D) if kv_format == KV_LAST else (2, T, H * D)


def gpu_paged_view(kv: torch.Tensor, layout: KVLayout, kv_format: str = KV_LAST) -> torch.Tensor:
    """vLLM's 4-D view ``kv`` (any strides, manager or kernel blocks) as [num_blocks, 2, T, H, D].

    The result is a strided view over the same memory, indexed by the manager's block ids."""
    if kv_format not in KV_FORMATS:
        raise ValueError(f"kv_format={kv_format!r} is not supported; expected one of {list(KV_FORMATS)}")
    T, D = layout.block_tokens, layout.head_size
    shape, st = tuple(kv.shape), kv.stride()
    tokens = shape[2] if kv.dim() == 4 else 0
    if not (kv.dim() == 4 and 0 < tokens <= T and T % tokens == 0
            and shape[1:] == block_shape_4d(layout, kv_format, tokens) and shape[0] % (T // tokens) == 0):
        raise ValueError(unrecognised(kv, layout, kv_format))
    ratio = T // tokens
    if ratio > 1 and st[0] != tokens * st[2]:
        raise ValueError(
            f"paged KV of shape {shape} (strides {st}) holds {ratio} kernel blocks of {tokens} tokens for each "
            f"{T}-token block, each kernel block all heads of its tokens (a head-major layout such as LBHNC): "
            "a block's tokens are then no single strided axis, which kvplug cannot read. "
            f"Use --block-size {tokens}, or VLLM_KV_CACHE_LAYOUT=LBNHC (token-major), whose kernel blocks "
            "follow each other."
        )
    if kv_format == KV_LAST:  # K and V side by side in the last dim: the K/V step is D elements of it
        strides = (st[0] * ratio, D * st[3], st[2], st[1], st[3])
    else:  # K and V planes in dim 1, heads packed in the last dim
        strides = (st[0] * ratio, st[1], st[2], D * st[3], st[3])
    return kv.as_strided((shape[0] // ratio, 2, T, layout.num_kv_heads, D), strides, kv.storage_offset())


def unrecognised(kv: torch.Tensor, layout: KVLayout, kv_format: str | None) -> str:
    """Why ``kv`` is refused: its shape and strides, and the shapes that would be read
    (``kv_format`` None: vLLM's CPU backend)."""
    T, H, D = layout.block_tokens, layout.num_kv_heads, layout.head_size
    accepted = [f"(2, blocks, {T}, {H}, {D})", f"(blocks, 2, {T}, {H}, {D})"]
    if kv_format is None:
        four_d = f"vLLM's CPU backend (blocks, {H}, {T}, {2 * D}), each block contiguous"
    else:
        h, _, c = block_shape_4d(layout, kv_format)
        four_d = (f"vLLM's {kv_format} view (blocks, {h}, {T}, {c}) or its kernel blocks "
                  f"(blocks * r, {h}, {T}/r, {c}), any strides")
    return (f"unrecognised paged KV shape {tuple(kv.shape)} (strides {kv.stride()}) for layout "
            f"block_tokens={T}, kv_heads={H}, head_size={D}; expected {', '.join(accepted)} or {four_d}. "
            "MLA and other single-tensor latent caches are not supported.")
