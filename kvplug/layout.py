"""KVLayout: the shape of one KV block, and a uniform view of vLLM's paged KV.

vLLM has several physical KV layouts (K/V split in a leading dim of 2 or
packed in the last dim, tokens before or after heads, permuted strides). The
rest of kvplug never sees them: ``paged_view`` turns any of them into one
logical strided view ``[num_blocks, 2 (K, V), block_tokens, kv_heads,
head_size]`` over the same memory, from the tensor's shape and strides and
what the caller says it holds (vLLM's 4-D GPU views: ``kvplug.paged_views``).

A stored block holds every layer of one block of tokens, layer-major, so that
one layer is a contiguous slice and can move on its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from kvplug.paged_views import KV_LAST, gpu_paged_view, unrecognised

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


@dataclass(frozen=True)
class BlockStrides:
    """Where K and V live inside one block of a 4-D CPU cache: (offset, token, head, dim), in elements.

    vLLM's CPU backend hands a ``(num_blocks, H, T, 2*D)`` tensor whose real order is
    up to its attention kernels (its "vec" ISA keeps K transposed, ``[D, T]`` per
    head, and V as ``[T, D]``), so the connector probes it with vLLM's own
    cache-write op (connectors/vllm/cpu_layout.py)."""

    k: tuple[int, int, int, int]
    v: tuple[int, int, int, int]

    @classmethod
    def plain(cls, T: int, H: int, D: int) -> "BlockStrides":
        """Per head all K tokens ``[T, D]`` then all V: what cpu_attn's Python side reads."""
        return cls(k=(0, D, 2 * T * D, 1), v=(T * D, D, 2 * T * D, 1))


class SplitKV:
    """The ``[num_blocks, 2, T, H, D]`` paged view where K and V have different strides.

    Not a tensor: it offers what the codec's torch path and the transfers use
    (index_select / index_copy_ on blocks, view as another dtype, shape).
    ``blocks``: the same memory as [num_blocks, elements per block] (each
    block one dense run), so whole blocks move as plain copies."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor | None = None):
        self.k, self.v = k, v  # each [num_blocks, T, H, D]
        self.blocks = blocks
        self.shape = torch.Size((k.shape[0], 2, *k.shape[1:]))
        self.dtype, self.device, self.is_cuda = k.dtype, k.device, k.is_cuda

    def dim(self) -> int:
        return 5

    def element_size(self) -> int:
        return self.k.element_size()

    def view(self, dtype: torch.dtype) -> "SplitKV":
        blocks = None if self.blocks is None else self.blocks.view(dtype)
        return SplitKV(self.k.view(dtype), self.v.view(dtype), blocks)

    def over(self, rows: torch.Tensor) -> "SplitKV":
        """The same view over other memory laid out as ``blocks``: rows [n, elements per block]."""
        def like(t: torch.Tensor) -> torch.Tensor:
            return rows.as_strided((rows.shape[0], *t.shape[1:]), (rows.stride(0), *t.stride()[1:]),
                                   rows.storage_offset() + t.storage_offset() - self.blocks.storage_offset())

        return SplitKV(like(self.k), like(self.v), rows)

    def index_select(self, dim: int, ids: torch.Tensor) -> torch.Tensor:
        assert dim == 0
        return torch.stack([self.k.index_select(0, ids), self.v.index_select(0, ids)], dim=1)

    def index_copy_(self, dim: int, ids: torch.Tensor, src: torch.Tensor) -> "SplitKV":
        assert dim == 0
        self.k.index_copy_(0, ids, src[:, 0])
        self.v.index_copy_(0, ids, src[:, 1])
        return self


def _dense_blocks(view: torch.Tensor) -> torch.Tensor | None:
    """view [nb, ...] as [nb, elements per block] over the same memory, when each
    block's elements fill one dense run (e.g. vLLM's CPU caches); else None."""
    dims = sorted((st, n) for st, n in zip(view.stride()[1:], view.shape[1:]) if n > 1)
    run = 1
    for st, n in dims:
        if st != run:
            return None
        run *= n
    if view.shape[0] > 1 and view.stride(0) < run:
        return None
    return view.as_strided((view.shape[0], run), (view.stride(0), 1))


def _runs(ids: list[int]):
    """(i, j, first id) of each run of consecutive ids."""
    i = 0
    for j in range(1, len(ids) + 1):
        if j == len(ids) or ids[j] != ids[j - 1] + 1:
            yield i, j, ids[i]
            i = j


def _block_rows(view) -> tuple[torch.Tensor, object] | None:
    """(blocks [nb, E], over(rows) -> the same view over rows [n, E]) for block-dense views."""
    if isinstance(view, SplitKV):
        return (view.blocks, view.over) if view.blocks is not None else None
    blocks = _dense_blocks(view)
    if blocks is None:
        return None
    return blocks, lambda rows: rows.as_strided((rows.shape[0], *view.shape[1:]), (rows.stride(0), *view.stride()[1:]),
                                                rows.storage_offset())


def _check_ids(view, ids: torch.Tensor, n: int | None, what: str) -> list[int]:
    # The copies below broadcast: a bad id or size must raise here, not repeat a block.
    listed = ids.tolist()
    if listed and (min(listed) < 0 or max(listed) >= view.shape[0]):
        raise IndexError(f"block ids must lie in [0, {view.shape[0]}), got {min(listed)}..{max(listed)}")
    if n is not None and n != len(listed):
        raise ValueError(f"{what} holds {n} blocks for {len(listed)} block ids")
    return listed


def gather_blocks(view, ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Blocks ``ids`` of a paged view as a contiguous [n, 2, T, H, D] tensor (``out`` if given).

    Block-dense views (CPU caches) copy whole blocks, then reorder once: an
    index_select through their permuted strides is several times slower."""
    rows = _block_rows(view) if not view.is_cuda else None
    if rows is None or len(ids) == 0:
        got = view.index_select(0, ids)
        return got if out is None else out.copy_(got)
    listed = _check_ids(view, ids, None if out is None else out.shape[0], "out")
    blocks, over = rows
    staged = torch.empty((len(ids), blocks.shape[1]), dtype=blocks.dtype)
    for i, j, b in _runs(listed):
        staged[i:j].copy_(blocks[b:b + j - i])
    src = over(staged)
    out = torch.empty(src.shape, dtype=src.dtype) if out is None else out
    if isinstance(src, SplitKV):
        out[:, 0].copy_(src.k)
        out[:, 1].copy_(src.v)
    else:
        out.copy_(src)
    return out


def scatter_blocks(view, ids: torch.Tensor, values: torch.Tensor) -> None:
    """Write values [n, 2, T, H, D] into blocks ``ids`` (distinct) of a paged view."""
    rows = _block_rows(view) if not view.is_cuda else None
    if rows is None or len(ids) == 0:
        view.index_copy_(0, ids, values)
        return
    listed = _check_ids(view, ids, values.shape[0], "values")
    blocks, over = rows
    staged = torch.empty((len(ids), blocks.shape[1]), dtype=blocks.dtype)
    dst = over(staged)
    if isinstance(dst, SplitKV):
        dst.k.copy_(values[:, 0])
        dst.v.copy_(values[:, 1])
    else:
        dst.copy_(values)
    for i, j, b in _runs(listed):
        blocks[b:b + j - i].copy_(staged[i:j])


def copy_tokens(view: torch.Tensor | SplitKV, block_id: int, src: torch.Tensor, n: int) -> None:
    """Write the first n tokens of src [2, T, H, D] into block block_id of a paged view."""
    if isinstance(view, SplitKV):
        view.k[block_id, :n].copy_(src[0, :n])
        view.v[block_id, :n].copy_(src[1, :n])
    else:
        view[block_id, :, :n].copy_(src[:, :n])


def paged_view(kv: torch.Tensor, layout: KVLayout, cpu_strides: BlockStrides | None = None, *,
               kv_format: str = KV_LAST) -> torch.Tensor | SplitKV:
    """A view ``[num_blocks, 2, block_tokens, kv_heads, head_size]`` of one layer's paged KV.

    Accepted:
      5-D ``(2, num_blocks, T, H, D)``    K/V split first (FlashAttention-style, before vLLM 0.32)
      5-D ``(num_blocks, 2, T, H, D)``    K/V split second (FlashInfer, Triton, before vLLM 0.32)
      4-D, ``cpu_strides`` given:         vLLM's CPU backend ``(num_blocks, H, T, 2*D)``, each
                                          block contiguous, K and V where ``cpu_strides`` says
                                          (probed: connectors/vllm/cpu_layout.py)
      4-D, no ``cpu_strides``:            vLLM's GPU runner view in ``kv_format`` (kv_last:
                                          ``(num_blocks, H, T, 2*D)``, K then V in the last dim;
                                          kv_planes: ``(num_blocks, 2, T, H*D)``), any
                                          KVCacheLayout strides, manager or kernel blocks
                                          (kvplug.paged_views)
    with any strides (HND/NHD physical permutations are read from the strides).
    The CPU backend's tensor and the kv_last view have the same shape: the
    caller, who knows which backend made it, passes ``cpu_strides`` for the CPU
    one only. When K and V have different strides the result is a SplitKV, not a tensor.
    """
    T, H, D = layout.block_tokens, layout.num_kv_heads, layout.head_size
    if kv.dtype != layout.torch_dtype:
        raise ValueError(f"paged KV has dtype {kv.dtype}, layout expects {layout.torch_dtype}")
    shape, st = tuple(kv.shape), kv.stride()
    if kv.dim() == 5 and shape[0] == 2 and shape[2:] == (T, H, D):
        return kv.permute(1, 0, 2, 3, 4)
    if kv.dim() == 5 and shape[1] == 2 and shape[2:] == (T, H, D):
        return kv
    if kv.dim() != 4:
        raise ValueError(unrecognised(kv, layout, None if cpu_strides else kv_format))
    if cpu_strides is None:
        return gpu_paged_view(kv, layout, kv_format)
    if shape[1:] != (H, T, 2 * D):
        raise ValueError(unrecognised(kv, layout, None))
    if not kv[0].is_contiguous():
        # cpu_strides place K and V inside one dense block: any other strides would be misread
        raise ValueError(
            f"paged KV of shape {shape} has strides {st}: not one contiguous run per block, as vLLM's CPU "
            f"backend keeps it (block strides ({H * T * 2 * D} or more, {T * 2 * D}, {2 * D}, 1)), so "
            "cpu_strides cannot place K and V in it. A GPU runner's view is read without cpu_strides."
        )
    nb, k, v = shape[0], cpu_strides.k, cpu_strides.v
    base = kv.storage_offset()
    if k[1:] == v[1:]:
        return kv.as_strided((nb, 2, T, H, D), (st[0], v[0] - k[0], *k[1:]), base + k[0])
    return SplitKV(kv.as_strided((nb, T, H, D), (st[0], *k[1:]), base + k[0]),
                   kv.as_strided((nb, T, H, D), (st[0], *v[1:]), base + v[0]),
                   kv.as_strided((nb, H * T * 2 * D), (st[0], 1), base))


def layout_from_paged(kv: torch.Tensor, num_layers: int, num_kv_heads: int, head_size: int, block_tokens: int) -> KVLayout:
    """Build a layout from what the model says and check one layer's tensor against it."""
    dtype = next((k for k, v in DTYPES.items() if v == kv.dtype), None)
    if dtype is None:
        raise ValueError(f"paged KV dtype {kv.dtype} is not supported; expected one of {sorted(DTYPES)}")
    layout = KVLayout(num_layers, num_kv_heads, head_size, block_tokens, dtype)
    paged_view(kv, layout)  # raises with a clear message if the shape does not fit
    return layout
