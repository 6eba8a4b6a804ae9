"""Fused int4kc decode: unpack, dequantize keys per channel, scatter into paged blocks.

The reverse of int4kc_encode: one program per (block, head, tile of DC
channels) for keys; int4h's decode kernel for values.
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
    tl.store(kv_ptr + off, x.to(kv_ptr.dtype.element_ty), mask=tmask[:, None] & cmask[None, :])


def int4kc_decode(src: torch.Tensor, kv: torch.Tensor, block_ids: torch.Tensor, group: int = 0) -> None:
    """Decode src uint8 [n, layer_bytes] into blocks ``block_ids`` (int64, on kv's device) of kv."""
    n = block_ids.numel()
    if n == 0:
        return
    check_encoded(src, kv)
    _, _, t, h, d = kv.shape
    check_group(d, group)
    p = key_params(kv)
    s_blk, _, s_tok, s_head, s_dim = kv.stride()
    # no FMA contraction: q * scale + zero rounds twice, as in the torch reference
    _int4kc_key_decode_kernel[(n, h, triton.cdiv(d, p["DC"]))](
        src, block_ids, kv, s_blk, s_tok, s_head, s_dim, src.stride(0), **p, enable_fp_fusion=False)
    decode_rows(src, kv, block_ids, group, kv0=1, meta_off=t * h * d + 4 * h * d)
