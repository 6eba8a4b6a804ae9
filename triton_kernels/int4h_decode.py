"""Fused int4h decode: unpack, dequantize, rotate back, scatter into paged blocks.

The exact reverse of int4h_encode: one program per BLOCK_R (token, head) rows
of K or V of one block. The Hadamard transform is its own inverse.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvplug.triton_kernels.hadamard import fwht_tile
from kvplug.triton_kernels.int4h_encode import check_encoded, launch_params


@triton.jit
def _to_bf16_rne(x):
    # Round to nearest even with integer ops: the interpreter's bf16 cast
    # truncates, so this keeps CPU tests and GPU bit-identical (and as torch).
    b = x.to(tl.uint32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    r = tl.where(x != x, 0x7FC0, r)  # canonical NaN, as torch
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _int4h_decode_kernel(
    src_ptr, ids_ptr, kv_ptr,
    s_blk, s_kv, s_tok, s_head, s_dim, src_row_stride,
    H: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
    G: tl.constexpr, NG: tl.constexpr, LOG2_HB: tl.constexpr, NORM: tl.constexpr, BLOCK_R: tl.constexpr,
    KV0: tl.constexpr, META_OFF: tl.constexpr, META_ROWS: tl.constexpr,
):
    i = tl.program_id(0)
    kv = KV0 + tl.program_id(1)  # K and V (int4h), or V alone (int4kc)
    r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < ROWS
    src_row = src_ptr + i.to(tl.int64) * src_row_stride

    c = tl.arange(0, DP // 2)
    code_off = (kv * ROWS + r)[:, None] * (D // 2) + c[None, :]
    packed = tl.load(src_row + code_off, mask=rmask[:, None] & (c[None, :] < D // 2), other=0).to(tl.int32)
    q = tl.reshape(tl.join(packed & 15, packed >> 4), (BLOCK_R, DP // G, G)).to(tl.float32)

    g = tl.arange(0, DP // G)
    gmask = rmask[:, None] & (g[None, :] < NG)
    meta = (src_row + META_OFF).to(tl.pointer_type(tl.float16))
    meta_off = ((kv - KV0) * ROWS + r)[:, None] * NG + g[None, :]
    s = tl.load(meta + meta_off, mask=gmask, other=0.0).to(tl.float32)
    z = tl.load(meta + META_ROWS * NG + meta_off, mask=gmask, other=0.0).to(tl.float32)
    y = tl.reshape(q * s[:, :, None] + z[:, :, None], (BLOCK_R, DP))
    x = fwht_tile(y, LOG2_HB, DP) * NORM

    d = tl.arange(0, DP)
    blk = tl.load(ids_ptr + i).to(tl.int64)
    row_off = blk * s_blk + kv * s_kv + (r // H) * s_tok + (r % H) * s_head
    if kv_ptr.dtype.element_ty == tl.bfloat16:
        x = _to_bf16_rne(x)
    tl.store(kv_ptr + row_off[:, None] + d[None, :] * s_dim, x.to(kv_ptr.dtype.element_ty),
             mask=rmask[:, None] & (d[None, :] < D))


def int4h_decode(src: torch.Tensor, kv: torch.Tensor, block_ids: torch.Tensor, group: int = 0) -> None:
    """Decode src uint8 [n, layer_bytes] into blocks ``block_ids`` (int64, on kv's device) of kv."""
    if block_ids.numel() == 0:
        return
    check_encoded(src, kv)
    decode_rows(src, kv, block_ids, group, kv0=0, meta_off=kv.shape[2] * kv.shape[3] * kv.shape[4])


def decode_rows(src, kv, block_ids, group: int, kv0: int, meta_off: int) -> None:
    """The reverse of int4h_encode.encode_rows: K and V (kv0=0) or V alone (kv0=1)."""
    p = launch_params(kv, group)
    grid = (block_ids.numel(), 2 - kv0, triton.cdiv(p["ROWS"], p["BLOCK_R"]))
    # no FMA contraction: q * scale + zero rounds twice, as in the torch reference
    _int4h_decode_kernel[grid](src, block_ids, kv, *kv.stride(), src.stride(0), **p, KV0=kv0,
                               META_OFF=meta_off, META_ROWS=(2 - kv0) * p["ROWS"], enable_fp_fusion=False)
