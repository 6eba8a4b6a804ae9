"""KVLayout: the shape of one KV block, and a uniform view of vLLM's paged KV.

vLLM has several physical KV layouts (K/V split in a leading dim of 2 or
packed in the last dim, tokens before or after heads, permuted strides). The
rest of kvplug never sees them: ``paged_view`` turns any of them into one
logical strided view ``[num_blocks, 2 (K, V), block_tokens, kv_heads,
head_size]`` over the same memory, from the tensor's shape and strides.

A stored block holds every layer of one block of tokens, layer-major, so that
one layer is a contiguous slice and can move on its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int  # per parallel rank
    head_size: int
    block_tokens: int
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"KVLayout: dtype {self.dtype!r} is not supported; expected one of {sorted(DTYPES)}")
        for name in ("num_layers", "num_kv_heads", "head_size", "block_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KVLayout: {name}={getattr(self, name)} must be positive")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize

    @property
    def block_shape(self) -> tuple[int, int, int, int]:
        """Logical shape of one layer of one block: (2, tokens, heads, head_size)."""
        return (2, self.block_tokens, self.num_kv_heads, self.head_size)

    def raw_layer_bytes(self) -> int:
        return 2 * self.block_tokens * self.num_kv_heads * self.head_size * self.itemsize

    def raw_block_bytes(self) -> int:
        return self.num_layers * self.raw_layer_bytes()

    def describe(self) -> dict:
        return asdict(self)


def paged_view(kv: torch.Tensor, layout: KVLayout) -> torch.Tensor:
    """A view ``[num_blocks, 2, block_tokens, kv_heads, head_size]`` of one layer's paged KV.

    Accepted (vLLM's backends):
      5-D ``(2, num_blocks, T, H, D)``      K/V split first (FlashAttention-style)
      5-D ``(num_blocks, 2, T, H, D)``      K/V split second (FlashInfer, Triton)
      4-D ``(num_blocks, H, T, 2*D)``       CPU backend: per (block, head) the memory is
                                            read as ``(2*T, D)``, all K tokens then all V
                                            (vLLM's cpu_attn views it so and chunks dim 2)
    with any strides (HND/NHD physical permutations are read from the strides).
    """
    T, H, D = layout.block_tokens, layout.num_kv_heads, layout.head_size
    if kv.dtype != layout.torch_dtype:
        raise ValueError(f"paged KV has dtype {kv.dtype}, layout expects {layout.torch_dtype}")
    shape, st = tuple(kv.shape), kv.stride()
    if kv.dim() == 5 and shape[0] == 2 and shape[2:] == (T, H, D):
        view = kv.permute(1, 0, 2, 3, 4)
    elif kv.dim() == 5 and shape[1] == 2 and shape[2:] == (T, H, D):
        view = kv
    elif kv.dim() == 4 and shape[1:] == (H, T, 2 * D) and st[2] == 2 * D * st[3]:
        nb = shape[0]
        view = kv.as_strided(
            (nb, 2, T, H, D), (st[0], T * D * st[3], D * st[3], st[1], st[3]), kv.storage_offset()
        )
    else:
        raise ValueError(
            f"unrecognised paged KV shape {shape} (strides {st}) for layout "
            f"block_tokens={T}, kv_heads={H}, head_size={D}; expected (2, blocks, {T}, {H}, {D}), "
            f"(blocks, 2, {T}, {H}, {D}) or (blocks, {H}, {T}, {2 * D}). "
            "MLA and other single-tensor latent caches are not supported."
        )
    return view


def layout_from_paged(kv: torch.Tensor, num_layers: int, num_kv_heads: int, head_size: int, block_tokens: int) -> KVLayout:
    """Build a layout from what the model says and check one layer's tensor against it."""
    dtype = next((k for k, v in DTYPES.items() if v == kv.dtype), None)
    if dtype is None:
        raise ValueError(f"paged KV dtype {kv.dtype} is not supported; expected one of {sorted(DTYPES)}")
    layout = KVLayout(num_layers, num_kv_heads, head_size, block_tokens, dtype)
    paged_view(kv, layout)  # raises with a clear message if the shape does not fit
    return layout
