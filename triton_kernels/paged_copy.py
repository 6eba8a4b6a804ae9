"""Raw codec: copy paged blocks to / from a contiguous buffer, bit-exact.

Values move as same-width integers (bf16/fp16 as int16, fp32 as int32), so
no float conversion can touch a NaN payload. One program copies BLOCK_R
(token, head) rows of K or V of one block; the buffer row of a block is its
[2, T, H, D] values, contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _paged_copy_kernel(
    kv_ptr, ids_ptr, buf_ptr,
    s_blk, s_kv, s_tok, s_head, s_dim, buf_row_stride,
    H: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK_R: tl.constexpr,
    TO_BUF: tl.constexpr,
):
    i = tl.program_id(0)
    kv = tl.program_id(1)
    r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, DP)
    mask = (r < ROWS)[:, None] & (d < D)[None, :]
    blk = tl.load(ids_ptr + i).to(tl.int64)
    paged = kv_ptr + (blk * s_blk + kv * s_kv + (r // H) * s_tok + (r % H) * s_head)[:, None] + d[None, :] * s_dim
    # buf_row_stride is in bytes; the buffer row is reinterpreted as KV elements
    row = (buf_ptr + i.to(tl.int64) * buf_row_stride).to(tl.pointer_type(kv_ptr.dtype.element_ty))
    flat = row + (kv * ROWS + r)[:, None] * D + d[None, :]
    if TO_BUF:
        tl.store(flat, tl.load(paged, mask=mask), mask=mask)
    else:
        tl.store(paged, tl.load(flat, mask=mask), mask=mask)


def _launch(kv: torch.Tensor, block_ids: torch.Tensor, buf: torch.Tensor, to_buf: bool) -> None:
    n = block_ids.numel()
    if n == 0:
        return
    item = kv.element_size()
    if buf.data_ptr() % item or buf.stride(0) % item:
        raise ValueError(f"raw buffer rows must be {item}-byte aligned for {kv.dtype}")
    if buf.device != kv.device and not (kv.is_cuda and buf.device.type == "cpu" and buf.is_pinned()):
        raise ValueError(f"raw buffer is on {buf.device} (not pinned), paged KV on {kv.device}")
    ikv = kv.view(_INT[item])
    _, _, t, h, d = kv.shape
    dp = triton.next_power_of_2(d)
    block_r = max(1, min(triton.next_power_of_2(t * h), 8192 // dp))
    grid = (n, 2, triton.cdiv(t * h, block_r))
    _paged_copy_kernel[grid](ikv, block_ids, buf, *kv.stride(), buf.stride(0),
                             H=h, ROWS=t * h, D=d, DP=dp, BLOCK_R=block_r, TO_BUF=to_buf)


def paged_gather(kv: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor) -> None:
    """Copy blocks ``block_ids`` of the paged view kv [nb, 2, T, H, D] into out uint8 [n, 2*T*H*D*itemsize]."""
    _launch(kv, block_ids, out, True)


def paged_scatter(src: torch.Tensor, kv: torch.Tensor, block_ids: torch.Tensor) -> None:
    """Copy src uint8 [n, 2*T*H*D*itemsize] into blocks ``block_ids`` of the paged view kv."""
    _launch(kv, block_ids, src, False)
