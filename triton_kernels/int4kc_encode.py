"""Fused int4kc encode: gather paged blocks, quantize keys per channel, pack.

Keys: one program per (block, head, tile of DC channels) loads the block's T
tokens of those channels, takes min and max over the tokens, quantizes and
packs two channels a byte (layout and arithmetic: kvplug/codec_int4kc.py).
Values: int4h's kernel, told to code V alone and where its scales go.
int4kcs (SINK): token 0 stays out of min/max, gets codes 0, and its K is
stored as it is at byte SINK_OFF of the row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvplug.codec_reference import check_group
from kvplug.triton_kernels.int4h_encode import (
    _NAN16_BITS, _affine, _max_nan, _min_nan, check_encoded, encode_rows,
)

# Values a program holds: TP tokens x DC channels (fp32, in registers on a GPU).
TILE_ELEMS = 4096


@triton.jit
def _int4kc_key_encode_kernel(
    kv_ptr, ids_ptr, out_ptr,
    s_blk, s_tok, s_head, s_dim, out_row_stride,
    T: tl.constexpr, TP: tl.constexpr, H: tl.constexpr, D: tl.constexpr, DC: tl.constexpr,
    SINK: tl.constexpr, SINK_OFF: tl.constexpr,
):
    i = tl.program_id(0)
    h = tl.program_id(1)
    c = tl.program_id(2) * DC + tl.arange(0, DC)
    t = tl.arange(0, TP)
    tmask = t < T
    cmask = c < D
    blk = tl.load(ids_ptr + i).to(tl.int64)  # int64: large caches pass 2^31 elements
    off = blk * s_blk + t[:, None] * s_tok + h * s_head + c[None, :] * s_dim  # K is slot 0
    x = tl.load(kv_ptr + off, mask=tmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    out_row = out_ptr + i.to(tl.int64) * out_row_stride
    ranged = tmask & (t > 0) if SINK else tmask
    if SINK:  # token 0's K as it is, bit for bit
        k0 = tl.load(kv_ptr + blk * s_blk + h * s_head + c * s_dim, mask=cmask)
        sink = (out_row + SINK_OFF).to(tl.pointer_type(kv_ptr.dtype.element_ty))
        tl.store(sink + h * D + c, k0, mask=cmask)

    # padding tokens (and the sink) stay out of min/max; NaN-propagating bounds flag non-finite channels
    mn = tl.reduce(tl.where(ranged[:, None], x, float("inf")), 0, _min_nan)
    mx = tl.reduce(tl.where(ranged[:, None], x, float("-inf")), 0, _max_nan)
    bad, scale16, zero16, s, z, inv = _affine(mn, mx)
    v = (x - z[None, :]) * inv[None, :] + 0.5
    q = tl.minimum(tl.maximum(v, 0.0), 15.5).to(tl.int32)  # truncation == floor(v + 0.5) clamped
    q = tl.where(bad[None, :], 0, q)
    if SINK:
        q = tl.where(t[:, None] == 0, 0, q)

    lo, hi = tl.split(tl.reshape(q, (TP, DC // 2, 2)))
    packed = (lo | (hi << 4)).to(tl.uint8)
    cc = tl.program_id(2) * (DC // 2) + tl.arange(0, DC // 2)
    tl.store(out_row + (t * H + h)[:, None] * (D // 2) + cc[None, :], packed,
             mask=tmask[:, None] & (cc[None, :] < D // 2))

    sbits = tl.where(bad, _NAN16_BITS, scale16.to(tl.int16, bitcast=True).to(tl.int32)).to(tl.int16)
    zbits = tl.where(bad, _NAN16_BITS, zero16.to(tl.int16, bitcast=True).to(tl.int32)).to(tl.int16)
    meta = (out_row + T * H * D).to(tl.pointer_type(tl.int16))  # K scales [H, D], then zeros
    tl.store(meta + h * D + c, sbits, mask=cmask)
    tl.store(meta + H * D + h * D + c, zbits, mask=cmask)


def key_params(kv: torch.Tensor) -> dict:
    """Constexprs of the key kernels for a paged view [nb, 2, T, H, D]."""
    _, _, t, h, d = kv.shape
    tp = triton.next_power_of_2(t)
    dc = min(triton.next_power_of_2(d), max(2, triton.next_power_of_2(TILE_ELEMS // tp)))
    return dict(T=t, TP=tp, H=h, D=d, DC=dc, num_warps=4)


def int4kc_encode(kv: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor, group: int = 0,
                  sink: bool = False) -> None:
    """Encode blocks ``block_ids`` (int64, on kv's device) of the paged view kv into out uint8 [n, layer_bytes]."""
    n = block_ids.numel()
    if n == 0:
        return
    check_encoded(out, kv)
    _, _, t, h, d = kv.shape
    ng = d // check_group(d, group)
    p = key_params(kv)
    s_blk, _, s_tok, s_head, s_dim = kv.stride()
    sink_off = t * h * d + 4 * h * d + 4 * t * h * ng  # int4kcs: after the V scales and zeros
    if sink and sink_off % kv.element_size():
        raise ValueError(f"int4kcs: sink section at byte {sink_off} is not {kv.element_size()}-byte aligned")
    # no FMA contraction: keeps the bytes identical to the torch reference
    _int4kc_key_encode_kernel[(n, h, triton.cdiv(d, p["DC"]))](
        kv, block_ids, out, s_blk, s_tok, s_head, s_dim, out.stride(0), **p, SINK=sink, SINK_OFF=sink_off,
        enable_fp_fusion=False)
    encode_rows(kv, block_ids, out, group, kv0=1, meta_off=t * h * d + 4 * h * d)
