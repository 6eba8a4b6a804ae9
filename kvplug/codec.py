"""Codecs: one layer of KV blocks <-> one row of bytes per block.

``get_codec("raw" | "int4h" | "int4kc" | "int4kcs", layout, group)`` returns a Codec. ``encode``
gathers blocks from a paged view (``kvplug.layout.paged_view``: [num_blocks,
2, T, H, D], any strides) into rows of a uint8 buffer; ``decode`` scatters
rows back. On CUDA tensors the fused Triton kernels run (imported on first
use); anywhere else the pure-torch reference in ``codec_reference`` does, in
chunks that bound its fp32 temporaries.

Encoded layout of one layer of one block (T tokens, H heads, D head size):
  raw    [2 (K,V), T, H, D] in the layout's dtype, contiguous; bit-exact.
  int4h  codes uint8 [2, T, H, D/2] (even index in the low nibble),
         then scales fp16 [2, T, H, NG], then zeros fp16 [2, T, H, NG],
         NG = D / group; value = code * scale + zero in the Hadamard domain.
  int4kc keys 4-bit per channel over the block's tokens (fp16 scale and zero
         per channel), values as int4h: layout in ``codec_int4kc``.
  int4kcs int4kc, each block's first token's keys kept exact (the attention
         sink of a chain's first block) and out of the channels' ranges.
See ``codec_reference`` for the arithmetic and non-finite inputs (NaN/Inf
decode to NaN over the Hadamard block and groups that hold them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvplug import codec_int4kc as kc
from kvplug import codec_reference as ref
from kvplug.layout import KVLayout

CODECS = ("raw", "int4h", "int4kc", "int4kcs")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Codec:
    name: str
    layout: KVLayout
    group: int = 0  # int4h (int4kc: V) quantization group (values per scale/zero); resolved, never 0

    @property
    def layer_bytes(self) -> int:
        """Encoded bytes of one layer of one block."""
        lay = self.layout
        if self.name == "raw":
            return lay.raw_layer_bytes()
        if self.name in ("int4kc", "int4kcs"):
            return kc.layer_bytes(lay.block_tokens, lay.num_kv_heads, lay.head_size, self.group, self._sink_itemsize)
        return ref.int4h_layer_bytes(lay.block_tokens, lay.num_kv_heads, lay.head_size, self.group)

    @property
    def _sink_itemsize(self) -> int:
        return self.layout.itemsize if self.name == "int4kcs" else 0

    @property
    def block_bytes(self) -> int:
        return self.layout.num_layers * self.layer_bytes

    def describe(self) -> dict:
        d = {"name": self.name, "format_version": FORMAT_VERSION}
        if self.name == "int4h":
            d.update(group=self.group, hadamard_block=ref.hadamard_block(self.layout.head_size))
        elif self.name in ("int4kc", "int4kcs"):
            d.update(key_group="block", value_group=self.group,
                     value_hadamard_block=ref.hadamard_block(self.layout.head_size))
            if self.name == "int4kcs":
                d.update(exact_keys="first token of each block")
        return d

    def encode(self, kv_view: torch.Tensor, block_ids, out: torch.Tensor) -> None:
        """Encode blocks ``block_ids`` of one layer's paged view into out uint8 [len(block_ids), layer_bytes]."""
        ids = self._check(kv_view, block_ids, out)
        if len(ids) == 0:
            return
        if not kv_view.is_cuda:
            if self.name == "raw":
                ref.raw_gather(kv_view, ids, out)
            elif self.name in ("int4kc", "int4kcs"):
                kc.encode(kv_view, ids, out, self.group, sink=self.name == "int4kcs")
            else:
                ref.int4h_encode(kv_view, ids, out, self.group)
            return
        for i, j, buf in _device_rows(out, kv_view.device, self.layer_bytes):
            self._kernel_encode(kv_view, ids[i:j], buf)
            if buf is not out:
                out[i:j].copy_(buf[: j - i])

    def decode(self, src: torch.Tensor, kv_view: torch.Tensor, block_ids) -> None:
        """Decode src uint8 [len(block_ids), layer_bytes] into blocks ``block_ids`` of one layer's paged view.

        ``block_ids`` must be distinct (a repeated id gets one of its rows).
        """
        ids = self._check(kv_view, block_ids, src)
        if len(ids) == 0:
            return
        if not kv_view.is_cuda:
            if self.name == "raw":
                ref.raw_scatter(src, kv_view, ids)
            elif self.name in ("int4kc", "int4kcs"):
                kc.decode(src, kv_view, ids, self.group, sink=self.name == "int4kcs")
            else:
                ref.int4h_decode(src, kv_view, ids, self.group)
            return
        for i, j, buf in _device_rows(src, kv_view.device, self.layer_bytes):
            if buf is not src:
                buf = buf[: j - i]
                buf.copy_(src[i:j])
            self._kernel_decode(buf, kv_view, ids[i:j])

    def _kernel_encode(self, kv, ids, out) -> None:
        if self.name == "raw":
            from kvplug.triton_kernels.paged_copy import paged_gather
            paged_gather(kv, ids, out)
        elif self.name in ("int4kc", "int4kcs"):
            from kvplug.triton_kernels.int4kc_encode import int4kc_encode
            int4kc_encode(kv, ids, out, self.group, sink=self.name == "int4kcs")
        else:
            from kvplug.triton_kernels.int4h_encode import int4h_encode
            int4h_encode(kv, ids, out, self.group)

    def _kernel_decode(self, src, kv, ids) -> None:
        if self.name == "raw":
            from kvplug.triton_kernels.paged_copy import paged_scatter
            paged_scatter(src, kv, ids)
        elif self.name in ("int4kc", "int4kcs"):
            from kvplug.triton_kernels.int4kc_decode import int4kc_decode
            int4kc_decode(src, kv, ids, self.group, sink=self.name == "int4kcs")
        else:
            from kvplug.triton_kernels.int4h_decode import int4h_decode
            int4h_decode(src, kv, ids, self.group)

    def _check(self, kv: torch.Tensor, block_ids, buf: torch.Tensor) -> torch.Tensor:
        lay = self.layout
        want = (2, lay.block_tokens, lay.num_kv_heads, lay.head_size)
        if kv.dim() != 5 or tuple(kv.shape[1:]) != want or kv.dtype != lay.torch_dtype:
            raise ValueError(
                f"{self.name} codec expects the paged view [num_blocks, {', '.join(map(str, want))}] of "
                f"{lay.torch_dtype} (kvplug.layout.paged_view), got {kv.dtype} {list(kv.shape)}"
            )
        ids = torch.as_tensor(block_ids, dtype=torch.long).reshape(-1)
        if buf.dtype != torch.uint8 or buf.dim() != 2 or tuple(buf.shape) != (len(ids), self.layer_bytes):
            raise ValueError(
                f"{self.name} codec buffer must be uint8 [{len(ids)}, {self.layer_bytes}], "
                f"got {buf.dtype} {list(buf.shape)}"
            )
        if len(ids) and buf.stride(1) != 1:
            raise ValueError(f"{self.name} codec buffer rows must be contiguous (stride 1 in the last dim)")
        # checked while still on the host: on the device the check would cost a sync
        if len(ids) and not ids.is_cuda and (int(ids.min()) < 0 or int(ids.max()) >= kv.shape[0]):
            raise IndexError(f"block ids must lie in [0, {kv.shape[0]}), got {int(ids.min())}..{int(ids.max())}")
        return ids.to(kv.device).contiguous()


def _device_rows(buf: torch.Tensor, device: torch.device, row_bytes: int):
    """(i, j, rows) spans of buf the kernels can address: buf itself when it is on the
    device or pinned; else a bounded device staging buffer, reused per span."""
    n = buf.shape[0]
    if buf.device == device or buf.is_pinned():
        yield 0, n, buf
        return
    step = max(1, (64 << 20) // row_bytes)  # 64 MiB staging at most
    stage = torch.empty((min(n, step), row_bytes), dtype=torch.uint8, device=device)
    for i in range(0, n, step):
        yield i, min(n, i + step), stage


def get_codec(name: str, layout: KVLayout, group: int = 0) -> Codec:
    """A codec for one layout. ``group`` (int4h; int4kc's values): values per scale/zero; 0 = head_size."""
    if name not in CODECS:
        raise ValueError(f"codec {name!r} is not supported; expected one of {list(CODECS)}")
    if name == "raw":
        if group:
            raise ValueError(f"codec 'raw' takes no group, got group={group}")
        return Codec("raw", layout, 0)
    if layout.head_size % 2:
        raise ValueError(f"codec {name!r} needs an even head_size, got {layout.head_size}")
    if name == "int4kcs" and layout.block_tokens < 2:
        raise ValueError(f"codec 'int4kcs' needs block_tokens >= 2, got {layout.block_tokens}")
    return Codec(name, layout, ref.check_group(layout.head_size, group))
