"""Pure-torch codecs: the CPU path and the oracle for the Triton kernels.

Everything here is vectorized over blocks, tokens and heads. The int4h
arithmetic is written op for op as the Triton kernels do it (same butterfly
order, same fp32 constants, no fused multiply-add), so the two agree bit for
bit: packed bytes, scales, zeros and decoded values.

int4h, per (block, K|V, token, head) vector of head_size D:
  1. rotate: y = H x, H block-diagonal Walsh-Hadamard with blocks of
     ``hadamard_block(D)`` (largest power of two dividing D, at most 256),
     scaled by 1/sqrt(block) so that H is orthonormal and H @ H = I;
  2. per group of ``group`` values of y (default D): zero = min, scale =
     (max - min) / 15, both stored as fp16; q = floor((y - zero) / scale + 0.5)
     clamped to 0..15 (reciprocal taken once per group, then multiplied;
     computed as trunc(clamp(v + 0.5, 0, 15.5)), the same codes);
  3. pack two codes a byte, even index in the low nibble.
Decode: y = q * scale + zero, x = H y.

Encoded layout of one layer of one block (T tokens, H heads, NG = D / group),
``layer_bytes = 2*T*H*(D/2 + 4*NG)``, little-endian, no padding:
  [0, T*H*D)                   codes uint8 [2 (K,V), T, H, D/2]
  [T*H*D, +4*T*H*NG)           scales fp16 [2, T, H, NG]
  [.., +4*T*H*NG)              zeros  fp16 [2, T, H, NG]

Non-finite input (NaN, +-Inf): the Hadamard block holding it rotates to
non-finite values, and every group that holds any of them is stored as codes
0, scale NaN, zero NaN (fp16 0x7E00): it decodes to NaN, the rest of the
vector decodes normally. Finite values beyond the fp16 range saturate: zero
and scale are clamped to +-65504 before the cast.

raw: the block's [2, T, H, D] values in the layout's dtype, contiguous;
copied as integers, so bit-exact (NaN payloads included).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kvplug.layout import gather_blocks, scatter_blocks

# Constants as fp32 values, shared with the kernels so both round alike.
INV15 = float(np.float32(1.0 / 15.0))
FP16_MAX = 65504.0
NAN16_BITS = 0x7E00
# Blocks per reference chunk: bounds the fp32 temporaries to ~16 MiB each.
CHUNK_ELEMS = 1 << 22

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def hadamard_block(head_size: int) -> int:
    """Largest power of two dividing head_size, capped at 256."""
    return min(head_size & -head_size, 256)


def hadamard_norm(block: int) -> float:
    return float(np.float32(1.0 / math.sqrt(block)))


def check_group(head_size: int, group: int) -> int:
    """The group size to use: 0 means head_size; otherwise a power of two >= 8 dividing it."""
    if group in (0, head_size):
        return head_size
    if group < 8 or group & (group - 1) or head_size % group:
        raise ValueError(
            f"int4h group={group} is not accepted for head_size={head_size}: use 0 (whole head) "
            f"or a power of two >= 8 that divides {head_size}"
        )
    return group


def int4h_layer_bytes(block_tokens: int, kv_heads: int, head_size: int, group: int) -> int:
    if head_size % 2:
        raise ValueError(f"int4h needs an even head_size, got {head_size}")
    ng = head_size // check_group(head_size, group)
    return 2 * block_tokens * kv_heads * (head_size // 2 + 4 * ng)


def fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """Normalized block-diagonal Walsh-Hadamard transform of fp32 x over its last dim."""
    shape, d = x.shape, x.shape[-1]
    s = 1
    while s < block:
        y = x.reshape(-1, d // (2 * s), 2, s)
        a, b = y[:, :, 0], y[:, :, 1]
        x = torch.stack((a + b, a - b), dim=2).reshape(shape)
        s *= 2
    return x * hadamard_norm(block)


def hadamard(x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """Normalized block-diagonal WHT over the last dim, in x's dtype (computed in fp32)."""
    block = block or hadamard_block(x.shape[-1])
    return fwht(x.float(), block).to(x.dtype)


def _chunks(n: int, per_block_elems: int):
    step = max(1, CHUNK_ELEMS // per_block_elems)
    for i in range(0, n, step):
        yield i, min(n, i + step)


def _as_ids(block_ids, device) -> torch.Tensor:
    return torch.as_tensor(block_ids, dtype=torch.long).to(device)


def _encode_values(x: torch.Tensor, group: int):
    """fp32 [n, 2, T, H, D] -> (codes uint8 [n, 2TH*D/2], scale bits, zero bits int16 [n, 2TH*NG])."""
    n, d = x.shape[0], x.shape[-1]
    y = fwht(x, hadamard_block(d))
    finite = torch.isfinite(y)
    y = torch.where(finite, y, 0.0)
    yg = y.reshape(n, -1, d // group, group)
    bad = ~finite.reshape(yg.shape).all(-1)
    mn = torch.where(bad, 0.0, yg.amin(-1))
    mx = torch.where(bad, 0.0, yg.amax(-1))
    scale16 = ((mx - mn) * INV15).clamp(0.0, FP16_MAX).half()
    zero16 = mn.clamp(-FP16_MAX, FP16_MAX).half()
    s, z = scale16.float(), zero16.float()
    inv = torch.where(s > 0, 1.0 / s, 0.0)
    q = ((yg - z[..., None]) * inv[..., None] + 0.5).clamp(0.0, 15.5)
    q = torch.where(bad[..., None], 0.0, q).to(torch.uint8).reshape(n, -1, 2)  # truncates: floor(v + 0.5)
    codes = q[..., 0] | (q[..., 1] << 4)
    nan = torch.tensor(NAN16_BITS, dtype=torch.int16)
    sbits = torch.where(bad, nan, scale16.view(torch.int16)).reshape(n, -1)
    zbits = torch.where(bad, nan, zero16.view(torch.int16)).reshape(n, -1)
    return codes, sbits, zbits


def _decode_values(src: torch.Tensor, shape, group: int) -> torch.Tensor:
    """uint8 [n, layer_bytes] -> fp32 [n, 2, T, H, D]."""
    n, (two, t, h, d) = src.shape[0], shape
    rows, ng = two * t * h, d // group
    codes = src[:, : rows * d // 2]
    tail = src[:, rows * d // 2 :].contiguous().view(torch.float16).float()
    s, z = tail[:, : rows * ng].reshape(n, rows, ng, 1), tail[:, rows * ng :].reshape(n, rows, ng, 1)
    q = torch.stack((codes & 15, codes >> 4), dim=-1).float().reshape(n, rows, ng, group)
    y = (q * s + z).reshape(n, two, t, h, d)
    return fwht(y, hadamard_block(d))


def int4h_encode(kv: torch.Tensor, block_ids, out: torch.Tensor, group: int = 0) -> None:
    """Encode blocks ``block_ids`` of the paged view kv [nb, 2, T, H, D] into out uint8 [n, layer_bytes]."""
    _, two, t, h, d = kv.shape
    group = check_group(d, group)
    ids = _as_ids(block_ids, kv.device)
    rows, ng = two * t * h, d // group
    _check_out(out, len(ids), int4h_layer_bytes(t, h, d, group))
    for i, j in _chunks(len(ids), rows * d):
        codes, sbits, zbits = _encode_values(gather_blocks(kv, ids[i:j]).float(), group)
        o = out[i:j]
        o[:, : rows * d // 2].copy_(codes)
        o[:, rows * d // 2 : rows * (d // 2 + 2 * ng)].copy_(sbits.view(torch.uint8))
        o[:, rows * (d // 2 + 2 * ng) :].copy_(zbits.view(torch.uint8))


def int4h_decode(src: torch.Tensor, kv: torch.Tensor, block_ids, group: int = 0) -> None:
    """Decode src uint8 [n, layer_bytes] into blocks ``block_ids`` of the paged view kv."""
    _, two, t, h, d = kv.shape
    group = check_group(d, group)
    ids = _as_ids(block_ids, kv.device)
    _check_out(src, len(ids), int4h_layer_bytes(t, h, d, group))
    for i, j in _chunks(len(ids), two * t * h * d):
        x = _decode_values(src[i:j].to(kv.device), (two, t, h, d), group)
        scatter_blocks(kv, ids[i:j], x.to(kv.dtype))


def raw_gather(kv: torch.Tensor, block_ids, out: torch.Tensor) -> None:
    """Copy blocks of kv [nb, 2, T, H, D] into out uint8 [n, 2*T*H*D*itemsize], bit-exact."""
    ids = _as_ids(block_ids, kv.device)
    per_block = math.prod(kv.shape[1:])
    _check_out(out, len(ids), per_block * kv.element_size())
    ikv = kv.view(_INT_VIEW[kv.element_size()])
    for i, j in _chunks(len(ids), per_block):
        gather_blocks(ikv, ids[i:j], out[i:j].view(ikv.dtype).view((j - i,) + tuple(kv.shape[1:])))


def raw_scatter(src: torch.Tensor, kv: torch.Tensor, block_ids) -> None:
    """Copy src uint8 [n, 2*T*H*D*itemsize] into blocks ``block_ids`` of kv, bit-exact."""
    ids = _as_ids(block_ids, kv.device)
    per_block = math.prod(kv.shape[1:])
    _check_out(src, len(ids), per_block * kv.element_size())
    ikv = kv.view(_INT_VIEW[kv.element_size()])
    for i, j in _chunks(len(ids), per_block):
        vals = src[i:j].to(kv.device).contiguous().view(ikv.dtype).reshape((j - i,) + tuple(kv.shape[1:]))
        scatter_blocks(ikv, ids[i:j], vals)


def _check_out(buf: torch.Tensor, n: int, row_bytes: int) -> None:
    if buf.dtype != torch.uint8 or buf.dim() != 2 or buf.shape[0] != n or buf.shape[1] != row_bytes:
        raise ValueError(
            f"encoded buffer must be uint8 [{n}, {row_bytes}], got {buf.dtype} {list(buf.shape)}"
        )
    if n and buf.stride(1) != 1:
        raise ValueError("encoded buffer rows must be contiguous (stride 1 in the last dim)")
