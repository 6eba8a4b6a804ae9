"""K and V of one layer through each KV code the codec benches compare.

Every function takes k, v [tokens, kv_heads, head_size] (bf16/fp16, as a KV
cache holds them) and returns them decoded, same shape and dtype:
  int4kcs, int4kc, int4h  kvplug's codecs, the real CPU path (Codec.encode/decode on a
                 paged view of blocks of ``block_tokens``; the last block is
                 filled by repeating the last token, which moves no min/max)
  int4           naive INT4: the same asymmetric 4-bit min-max code as int4h
                 with fp16 scale and zero per (token, head) vector, no rotation
  fp8            a cast to float8_e4m3fn and back (no scale)
"""

from __future__ import annotations

import torch

from kvplug import codec_reference as ref
from kvplug.codec import get_codec
from kvplug.layout import KVLayout

_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def through_codec(name: str, k: torch.Tensor, v: torch.Tensor, block_tokens: int, group: int = 0):
    t, h, d = k.shape
    pad = -t % block_tokens
    kv = torch.stack((k, v))  # [2, t, h, d]
    if pad:
        kv = torch.cat((kv, kv[:, -1:].expand(2, pad, h, d)), dim=1)
    nb = kv.shape[1] // block_tokens
    view = kv.reshape(2, nb, block_tokens, h, d).transpose(0, 1).contiguous()
    codec = get_codec(name, KVLayout(1, h, d, block_tokens, _DTYPES[k.dtype]), group)
    buf = torch.empty(nb, codec.layer_bytes, dtype=torch.uint8)
    ids = torch.arange(nb)
    codec.encode(view, ids, buf)
    out = torch.empty_like(view)
    codec.decode(buf, out, ids)
    out = out.transpose(0, 1).reshape(2, -1, h, d)[:, :t]
    return out[0], out[1]


def int4_naive(x: torch.Tensor, group: int = 0) -> torch.Tensor:
    """Asymmetric min-max 4-bit per group with fp16 scale and zero, no rotation."""
    t, h, d = x.shape
    g = group or d
    xg = x.float().reshape(t, h, d // g, g)
    mn, mx = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
    s = ((mx - mn) * ref.INV15).half().float()
    z = mn.half().float()
    inv = torch.where(s > 0, 1.0 / s, 0.0)
    q = ((xg - z) * inv + 0.5).clamp(0, 15.5).floor()
    return (q * s + z).reshape(t, h, d).to(x.dtype)


def fp8(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float8_e4m3fn).to(x.dtype)


def method(name: str, block_tokens: int = 16, group: int = 0):
    """(k, v) -> (k~, v~) for one of: exact, int4kcs, int4kc, int4h, int4, fp8."""
    if name in ("int4kcs", "int4kc", "int4h"):
        return lambda k, v: through_codec(name, k, v, block_tokens, group)
    if name == "int4":
        return lambda k, v: (int4_naive(k, group), int4_naive(v, group))
    if name == "fp8":
        return lambda k, v: (fp8(k), fp8(v))
    if name == "exact":
        return lambda k, v: (k, v)
    raise ValueError(name)
