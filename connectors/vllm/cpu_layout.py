"""Where vLLM's CPU backend really keeps K and V inside a block.

The CPU backend hands a ``(num_blocks, H, T, 2*D)`` tensor, but the order of
its elements belongs to the attention ISA's own cache-write kernel (the "vec"
ISA keeps K transposed, ``[D, T]`` per head). Rather than hard-code one, write
a block with vLLM's own op, each element tagged with its (token, head, dim),
and read back where each landed. Stored blocks then hold KV in one canonical
order whatever the ISA, so int4h quantizes real head vectors and a store is
portable between machines.
"""

from __future__ import annotations

import functools

import torch

from kvplug.layout import BlockStrides, KVLayout


def _isa(layout: KVLayout) -> str:
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(layout.torch_dtype, layout.block_tokens, layout.head_size)


@functools.lru_cache(maxsize=8)
def probe_block_strides(layout: KVLayout, isa: str | None = None) -> BlockStrides:
    from vllm import _custom_ops as ops

    T, H, D = layout.block_tokens, layout.num_kv_heads, layout.head_size
    isa = isa or _isa(layout)
    cache = torch.zeros(1, H, T, 2 * D, dtype=layout.torch_dtype)
    k_cache, v_cache = cache.view(1, H, 2 * T, D).chunk(2, dim=2)  # as cpu_attn passes them
    idx = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(D), indexing="ij")

    def where(axis: int, digit: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per cache element: digit (base 128, exact in bf16) of the K and of the V index it holds."""
        tag = (idx[axis] // 128**digit % 128 + 1).to(layout.torch_dtype)
        out = []
        for which in ("k", "v"):
            cache.zero_()
            zero = torch.zeros_like(tag)
            k, v = (tag, zero) if which == "k" else (zero, tag)
            ops.cpu_attn_reshape_and_cache(k.contiguous(), v.contiguous(), k_cache, v_cache,
                                           torch.arange(T, dtype=torch.long), isa)
            out.append(cache.flatten().float() - 1)
        return out[0], out[1]

    strides = []
    for which in (0, 1):
        # physical offset of every (t, h, d) of K (which=0) or V (which=1)
        found = torch.zeros(T, H, D, dtype=torch.long)
        pos = torch.zeros(cache.numel(), dtype=torch.long)
        owned = torch.ones(cache.numel(), dtype=torch.bool)
        for axis, n in ((0, T), (1, H), (2, D)):
            digits = 1 if n <= 128 else 2
            value = torch.zeros(cache.numel(), dtype=torch.long)
            for digit in range(digits):
                tags = where(axis, digit)[which]
                owned &= tags >= 0
                value += tags.clamp(min=0).long() * 128**digit
            pos = pos * n + value
        if int(owned.sum()) != T * H * D:
            raise ValueError(f"kvplug: vLLM's CPU attention ISA {isa!r} stores {which and 'V' or 'K'} in a way "
                             "this probe cannot read (not one element per token/head/dim)")
        found.view(-1)[pos[owned]] = torch.nonzero(owned).flatten()
        o = int(found[0, 0, 0])
        s = (int(found[1, 0, 0]) - o if T > 1 else 0, int(found[0, 1, 0]) - o if H > 1 else 0,
             int(found[0, 0, 1]) - o if D > 1 else 0)
        t, h, d = idx
        if not torch.equal(found, o + t * s[0] + h * s[1] + d * s[2]):
            raise ValueError(f"kvplug: vLLM's CPU attention ISA {isa!r} stores {'KV'[which]} in a blocked "
                             "layout that is not a strided view; kvplug does not support it yet")
        strides.append((o, *s))
    return BlockStrides(k=strides[0], v=strides[1])
