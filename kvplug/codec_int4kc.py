"""int4kc, pure torch: keys 4-bit per channel over the block, values as int4h.

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

Encoded layout of one layer of one block (T tokens, H heads, D head size,
NG = D / group), ``layer_bytes = T*H*D + 4*H*D + 4*T*H*NG``, no padding:
  [0, T*H*D)          codes uint8 [2 (K,V), T, H, D/2], even channel low nibble
  [T*H*D, +2*H*D)     K scales fp16 [H, D]
  [.., +2*H*D)        K zeros  fp16 [H, D]
  [.., +2*T*H*NG)     V scales fp16 [T, H, NG]
  [.., +2*T*H*NG)     V zeros  fp16 [T, H, NG]
"""

from __future__ import annotations

import torch

from kvplug import codec_reference as ref
from kvplug.layout import gather_blocks, scatter_blocks


def layer_bytes(block_tokens: int, kv_heads: int, head_size: int, group: int) -> int:
    if head_size % 2:
        raise ValueError(f"int4kc needs an even head_size, got {head_size}")
    t, h, d = block_tokens, kv_heads, head_size
    return t * h * d + 4 * h * d + 4 * t * h * (d // ref.check_group(d, group))


def _encode_keys(k: torch.Tensor):
    """fp32 [n, T, H, D] -> (codes uint8 [n, T*H*D/2], scale bits, zero bits int16 [n, H*D])."""
    n = k.shape[0]
    finite = torch.isfinite(k)
    k = torch.where(finite, k, 0.0)
    bad = ~finite.all(1)  # [n, H, D]
    mn = torch.where(bad, 0.0, k.amin(1))
    mx = torch.where(bad, 0.0, k.amax(1))
    scale16 = ((mx - mn) * ref.INV15).clamp(0.0, ref.FP16_MAX).half()
    zero16 = mn.clamp(-ref.FP16_MAX, ref.FP16_MAX).half()
    s, z = scale16.float()[:, None], zero16.float()[:, None]
    inv = torch.where(s > 0, 1.0 / s, 0.0)
    q = ((k - z) * inv + 0.5).clamp(0.0, 15.5)
    q = torch.where(bad[:, None], 0.0, q).to(torch.uint8).reshape(n, -1, 2)  # truncates
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


def encode(kv: torch.Tensor, block_ids, out: torch.Tensor, group: int = 0) -> None:
    """Encode blocks ``block_ids`` of the paged view kv [nb, 2, T, H, D] into out uint8 [n, layer_bytes]."""
    _, two, t, h, d = kv.shape
    group = ref.check_group(d, group)
    ids = torch.as_tensor(block_ids, dtype=torch.long).to(kv.device)
    ref._check_out(out, len(ids), layer_bytes(t, h, d, group))
    half, ng = t * h * d // 2, d // group
    kmeta = t * h * d  # byte offset of the K scales
    vmeta = kmeta + 4 * h * d
    for i, j in ref._chunks(len(ids), two * t * h * d):
        x = gather_blocks(kv, ids[i:j]).float()
        o = out[i:j]
        codes, sbits, zbits = _encode_keys(x[:, 0])
        o[:, :half].copy_(codes)
        o[:, kmeta : kmeta + 2 * h * d].copy_(sbits.view(torch.uint8))
        o[:, kmeta + 2 * h * d : vmeta].copy_(zbits.view(torch.uint8))
        codes, sbits, zbits = ref._encode_values(x[:, 1:], group)
        o[:, half : 2 * half].copy_(codes)
        o[:, vmeta : vmeta + 2 * t * h * ng].copy_(sbits.view(torch.uint8))
        o[:, vmeta + 2 * t * h * ng :].copy_(zbits.view(torch.uint8))


def decode(src: torch.Tensor, kv: torch.Tensor, block_ids, group: int = 0) -> None:
    """Decode src uint8 [n, layer_bytes] into blocks ``block_ids`` of the paged view kv."""
    _, two, t, h, d = kv.shape
    group = ref.check_group(d, group)
    ids = torch.as_tensor(block_ids, dtype=torch.long).to(kv.device)
    ref._check_out(src, len(ids), layer_bytes(t, h, d, group))
    half, kmeta = t * h * d // 2, t * h * d
    vmeta = kmeta + 4 * h * d
    for i, j in ref._chunks(len(ids), two * t * h * d):
        s = src[i:j].to(kv.device)
        kmeta16 = s[:, kmeta:vmeta].contiguous().view(torch.float16).float()
        k = _decode_keys(s[:, :half], kmeta16, (t, h, d))
        v_src = torch.cat((s[:, half : 2 * half], s[:, vmeta:]), dim=1)
        v = ref._decode_values(v_src, (1, t, h, d), group)
        scatter_blocks(kv, ids[i:j], torch.stack((k, v[:, 0]), dim=1).to(kv.dtype))
