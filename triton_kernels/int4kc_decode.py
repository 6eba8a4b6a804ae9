"""Fused int4kc decode: unpack, dequantize keys per channel, scatter into paged blocks.

The reverse of int4kc_encode: one program per (block, head, tile of DC
channels) for keys; int4h's decode kernel for values. int4kcs (SINK):
token 0's K is copied back from byte SINK_OFF of the row as it was stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvplug.codec_reference import check_group
from kvplug.triton_kernels.int4h_decode import _to_bf16_rne, decode_rows
from kvplug.triton_kernels.int4h_encode import check_encoded
from kvplug.triton_kernels.int4kc_encode import key_params


@triton.jit
def _int4kc_key_decode_kernel(
    src_ptr, ids_ptr, kv_ptr,
    s_blk, s_tok, s_head, s_dim, src_row_stride,
    T: tl.constexpr, TP: tl.constexpr, H: tl.constexpr, D: tl.constexpr, DC: tl.constexpr,
    SINK: tl.constexpr, SINK_OFF: tl.constexpr,
):
    i = tl.program_id(0)
    h = tl.program_id(1)
    t = tl.arange(0, TP)
    tmask = t < T
    src_row = src_ptr + i.to(tl.int64) * src_row_stride

    cc = tl.program_id(2) * (DC // 2) + tl.arange(0, DC // 2)
    packed = tl.load(src_row + (t * H + h)[:, None] * (D // 2) + cc[None, :],
                     mask=tmask[:, None] & (cc[None, :] < D // 2), other=0).to(tl.int32)
    q = tl.reshape(tl.join(packed & 15, packed >> 4), (TP, DC)).to(tl.float32)

    c = tl.program_id(2) * DC + tl.arange(0, DC)
    cmask = c < D
    meta = (src_row + T * H * D).to(tl.pointer_type(tl.float16))
    s = tl.load(meta + h * D + c, mask=cmask, other=0.0).to(tl.float32)
    z = tl.load(meta + H * D + h * D + c, mask=cmask, other=0.0).to(tl.float32)
    x = q * s[None, :] + z[None, :]

    blk = tl.load(ids_ptr + i).to(tl.int64)
    off = blk * s_blk + t[:, None] * s_tok + h * s_head + c[None, :] * s_dim
    if kv_ptr.dtype.element_ty == tl.bfloat16:
        x = _to_bf16_rne(x)
    if SINK:
        tl.store(kv_ptr + off, x.to(kv_ptr.dtype.element_ty), mask=(tmask & (t > 0))[:, None] & cmask[None, :])
        sink = (src_row + SINK_OFF).to(tl.pointer_type(kv_ptr.dtype.element_ty))
        k0 = tl.load(sink + h * D + c, mask=cmask)
        tl.store(kv_ptr + blk * s_blk + h * s_head + c * s_dim, k0, mask=cmask)
    else:
        tl.store(kv_ptr + off, x.to(kv_ptr.dtype.element_ty), mask=tmask[:, None] & cmask[None, :])


def int4kc_decode(src: torch.Tensor, kv: torch.Tensor, block_ids: torch.Tensor, group: int = 0,
                  sink: bool = False) -> None:
    """Decode src uint8 [n, layer_bytes] into blocks ``block_ids`` (int64, on kv's device) of kv."""
    n = block_ids.numel()
    if n == 0:
        return
    check_encoded(src, kv)
    _, _, t, h, d = kv.shape
    ng = d // check_group(d, group)
    p = key_params(kv)
    s_blk, _, s_tok, s_head, s_dim = kv.stride()
    sink_off = t * h * d + 4 * h * d + 4 * t * h * ng  # int4kcs: after the V scales and zeros
    if sink and sink_off % kv.element_size():
        raise ValueError(f"int4kcs: sink section at byte {sink_off} is not {kv.element_size()}-byte aligned")
    # no FMA contraction: q * scale + zero rounds twice, as in the torch reference
    _int4kc_key_decode_kernel[(n, h, triton.cdiv(d, p["DC"]))](
        src, block_ids, kv, s_blk, s_tok, s_head, s_dim, src.stride(0), **p, SINK=sink, SINK_OFF=sink_off,
        enable_fp_fusion=False)
    decode_rows(src, kv, block_ids, group, kv0=1, meta_off=t * h * d + 4 * h * d)
