"""int4kc and int4kcs, pure torch: keys 4-bit per channel over the block, values as int4h.

The CPU path and the oracle for kvplug/triton_kernels/int4kc_*.py, op for op
as the kernels do it (same fp32 constants, no fused multiply-add).

Why keys differ from values: trained models' keys carry large per-channel
components that are nearly constant over tokens (Qwen2's key biases: 20-600x
the median channel; the massive low-frequency RoPE channels of Llama-style
models), and queries are large in the same channels. A per-token code
(int4h) spends its 16 levels on that constant and puts its error exactly
where the queries amplify it; a per-channel code over the block's tokens
stores the constant in the channel's zero and quantizes only what varies
(KIVI's key grouping, decided here from perplexity: bench/codec_perplexity.py).
Values have no such structure and keep int4h's per-token rotated code.

Per (block, head, channel c) of K, over the block's T tokens:
  zero = min_t k[t, c], scale = (max - min) / 15 (fp16, saturating at
  +-65504), q = trunc(clamp((k - zero) * (1 / scale) + 0.5, 0, 15.5));
  decode k = q * scale + zero. A channel holding NaN/Inf is stored as codes
  0, scale and zero NaN (0x7E00): it decodes to NaN over the block.
V: int4h's per-(token, head) Hadamard code with ``group`` (codec_reference).

int4kcs (``sink=True``): the block's first token's keys are kept exact (the
layout's dtype, appended [H, D]) and left out of the channels' min/max; its
codes are 0. A chain's first token is the attention sink: its keys are far
from the rest in some channels, and in int4kc they stretch those channels'
range for the whole block (SmolLM2-135M, 128-token blocks, restored prefix:
+1.15% perplexity, +0.34% with that token's K exact: bench/codec_error_sources.py).
Every block keeps its first token so, whether it starts a chain or not: the
codec does not need to know. Needs block_tokens >= 2.

Encoded layout of one layer of one block (T tokens, H heads, D head size,
NG = D / group), ``layer_bytes = T*H*D + 4*H*D + 4*T*H*NG``, no padding:
  [0, T*H*D)          codes uint8 [2 (K,V), T, H, D/2], even channel low nibble
  [T*H*D, +2*H*D)     K scales fp16 [H, D]
  [.., +2*H*D)        K zeros  fp16 [H, D]
  [.., +2*T*H*NG)     V scales fp16 [T, H, NG]
  [.., +2*T*H*NG)     V zeros  fp16 [T, H, NG]
  int4kcs only: [.., +H*D*itemsize) token 0's K, the layout's dtype [H, D]
"""

from __future__ import annotations

import torch

from kvplug import codec_reference as ref
from kvplug.layout import gather_blocks, scatter_blocks


def layer_bytes(block_tokens: int, kv_heads: int, head_size: int, group: int, sink_itemsize: int = 0) -> int:
    """int4kc; int4kcs with ``sink_itemsize`` (the layout's bytes per value) > 0."""
    if head_size % 2:
        raise ValueError(f"int4kc needs an even head_size, got {head_size}")
    if sink_itemsize and block_tokens < 2:
        raise ValueError(f"int4kcs needs block_tokens >= 2, got {block_tokens}")
    t, h, d = block_tokens, kv_heads, head_size
    return t * h * d + 4 * h * d + 4 * t * h * (d // ref.check_group(d, group)) + h * d * sink_itemsize


def _encode_keys(k: torch.Tensor, sink: bool = False):
    """fp32 [n, T, H, D] -> (codes uint8 [n, T*H*D/2], scale bits, zero bits int16 [n, H*D]).
    ``sink``: token 0 stays out of the bounds and gets codes 0 (it is kept exact)."""
    n = k.shape[0]
    finite = torch.isfinite(k)
    k = torch.where(finite, k, 0.0)
    r = k[:, 1:] if sink else k
    bad = ~finite[:, 1:].all(1) if sink else ~finite.all(1)  # [n, H, D]
    mn = torch.where(bad, 0.0, r.amin(1))
    mx = torch.where(bad, 0.0, r.amax(1))
    scale16 = ((mx - mn) * ref.INV15).clamp(0.0, ref.FP16_MAX).half()
    zero16 = mn.clamp(-ref.FP16_MAX, ref.FP16_MAX).half()
    s, z = scale16.float()[:, None], zero16.float()[:, None]
    inv = torch.where(s > 0, 1.0 / s, 0.0)
    q = ((k - z) * inv + 0.5).clamp(0.0, 15.5)
    q = torch.where(bad[:, None], 0.0, q)
    if sink:
        q[:, 0] = 0.0
    q = q.to(torch.uint8).reshape(n, -1, 2)  # truncates
    codes = q[..., 0] | (q[..., 1] << 4)
    nan = torch.tensor(ref.NAN16_BITS, dtype=torch.int16)
    sbits = torch.where(bad, nan, scale16.view(torch.int16)).reshape(n, -1)
    zbits = torch.where(bad, nan, zero16.view(torch.int16)).reshape(n, -1)
    return codes, sbits, zbits


def _decode_keys(codes: torch.Tensor, meta: torch.Tensor, shape) -> torch.Tensor:
    """codes uint8 [n, T*H*D/2], meta fp32 [n, 2*H*D] -> fp32 [n, T, H, D]."""
    n, (t, h, d) = codes.shape[0], shape
    s, z = meta[:, : h * d].reshape(n, 1, h, d), meta[:, h * d :].reshape(n, 1, h, d)
    q = torch.stack((codes & 15, codes >> 4), dim=-1).float().reshape(n, t, h, d)
    return q * s + z


def encode(kv: torch.Tensor, block_ids, out: torch.Tensor, group: int = 0, sink: bool = False) -> None:
    """Encode blocks ``block_ids`` of the paged view kv [nb, 2, T, H, D] into out uint8 [n, layer_bytes]."""
    _, two, t, h, d = kv.shape
    group = ref.check_group(d, group)
    ids = torch.as_tensor(block_ids, dtype=torch.long).to(kv.device)
    sink_bytes = h * d * kv.element_size() if sink else 0
    ref._check_out(out, len(ids), layer_bytes(t, h, d, group, kv.element_size() if sink else 0))
    half, ng = t * h * d // 2, d // group
    kmeta = t * h * d  # byte offset of the K scales
    vmeta = kmeta + 4 * h * d
    for i, j in ref._chunks(len(ids), two * t * h * d):
        raw = gather_blocks(kv, ids[i:j])
        x = raw.float()
        o = out[i:j]
        if sink:  # token 0's K, bit for bit
            o[:, o.shape[1] - sink_bytes :].copy_(raw[:, 0, 0].contiguous().view(torch.uint8).reshape(j - i, -1))
        codes, sbits, zbits = _encode_keys(x[:, 0], sink)
        o[:, :half].copy_(codes)
        o[:, kmeta : kmeta + 2 * h * d].copy_(sbits.view(torch.uint8))
        o[:, kmeta + 2 * h * d : vmeta].copy_(zbits.view(torch.uint8))
        codes, sbits, zbits = ref._encode_values(x[:, 1:], group)
        o[:, half : 2 * half].copy_(codes)
        o[:, vmeta : vmeta + 2 * t * h * ng].copy_(sbits.view(torch.uint8))
        o[:, vmeta + 2 * t * h * ng : vmeta + 4 * t * h * ng].copy_(zbits.view(torch.uint8))


def decode(src: torch.Tensor, kv: torch.Tensor, block_ids, group: int = 0, sink: bool = False) -> None:
    """Decode src uint8 [n, layer_bytes] into blocks ``block_ids`` of the paged view kv."""
    _, two, t, h, d = kv.shape
    group = ref.check_group(d, group)
    ids = torch.as_tensor(block_ids, dtype=torch.long).to(kv.device)
    nbytes = layer_bytes(t, h, d, group, kv.element_size() if sink else 0)
    vend = t * h * d + 4 * h * d + 4 * t * h * (d // group)  # end of the V scales and zeros
    ref._check_out(src, len(ids), nbytes)
    half, kmeta = t * h * d // 2, t * h * d
    vmeta = kmeta + 4 * h * d
    for i, j in ref._chunks(len(ids), two * t * h * d):
        s = src[i:j].to(kv.device)
        kmeta16 = s[:, kmeta:vmeta].contiguous().view(torch.float16).float()
        k = _decode_keys(s[:, :half], kmeta16, (t, h, d))
        v_src = torch.cat((s[:, half : 2 * half], s[:, vmeta:vend]), dim=1)
        v = ref._decode_values(v_src, (1, t, h, d), group)
        out = torch.stack((k, v[:, 0]), dim=1).to(kv.dtype)
        if sink:
            out[:, 0, 0] = s[:, vend:].contiguous().view(kv.dtype).reshape(j - i, h, d)
        scatter_blocks(kv, ids[i:j], out)
