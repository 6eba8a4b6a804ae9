"""kvplug on the KV views vLLM 0.32's GPU runner hands a connector: every KVCacheLayout,
1/2/8 KV heads, 16- and 32-token blocks and 32-token blocks split into 16-token kernel
blocks, built by vLLM's own allocator (vllm_caches.py); on CUDA too when there is one."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")
from vllm import _custom_ops  # noqa: E402,F401  (loads vLLM's ops: torch.ops._C)
from vllm_caches import LAYOUTS, attention_spec, vllm_caches  # noqa: E402

from kvplug.codec import get_codec  # noqa: E402
from kvplug.connectors.vllm.layout_check import (  # noqa: E402
    LayoutCheckError, backend_split, kv_format_of, self_check)
from kvplug.layout import BlockStrides, KVLayout, SplitKV, gather_blocks, paged_view, scatter_blocks  # noqa: E402
from kvplug.paged_views import KV_LAST, KV_PLANES  # noqa: E402
from kvplug.transfer import LayerPipeline  # noqa: E402

D, NB, NUM_LAYERS = 64, 4, 2
CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (Triton codec)"))]


def cases():
    """(vLLM layout, KV heads, block size, kernel block size): vLLM splits blocks only in LBHNC / LBNHC."""
    out = [(lay, h, bs, None) for lay in LAYOUTS for h in (1, 2, 8) for bs in (16, 32)]
    return out + [(lay, h, 32, 16) for lay in ("LBNHC", "LBHNC") for h in (1, 2, 8)]


def refused(layout, heads, block, kernel):
    """LBHNC kernel blocks with several heads: a block's tokens are no single strided axis."""
    return kernel is not None and layout == "LBHNC" and heads > 1


CASES = [pytest.param(*c, id=f"{c[0]}-h{c[1]}-b{c[2]}{'/' + str(c[3]) if c[3] else ''}") for c in cases()]
READ = [c for c in CASES if not refused(*c.values)]


def setup(layout, heads, block, kernel, device, kv_format=KV_LAST):
    lay = KVLayout(NUM_LAYERS, heads, D, block, "bfloat16")
    caches = vllm_caches(layout, heads=heads, head_size=D, block_size=block, kernel_block_size=kernel,
                         num_blocks=NB, num_layers=NUM_LAYERS, device=device, kv_format=kv_format)
    return lay, caches


def backend_blocks(kv, lay, kv_format=KV_LAST):
    """[num_blocks, 2, T, H, D] as vLLM's attention sees it, kernel rows grouped per manager block."""
    k, v = backend_split(kv, lay, kv_format)
    return torch.stack([k, v], 1).unflatten(0, (NB, -1)).transpose(1, 2).flatten(2, 3)


def fill(kv, lay, seed, kv_format=KV_LAST):
    """Random values written the way vLLM's attention writes them; returns them as [num_blocks, 2, T, H, D]."""
    g = torch.Generator().manual_seed(seed)
    for t in backend_split(kv, lay, kv_format):
        t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
    return backend_blocks(kv, lay, kv_format)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout,heads,block,kernel", CASES)
def test_view_is_what_the_backend_attends_over(layout, heads, block, kernel, device):
    lay, caches = setup(layout, heads, block, kernel, device)
    if refused(layout, heads, block, kernel):
        with pytest.raises(ValueError, match=r"2 kernel blocks of 16 tokens.*--block-size 16.*LBNHC"):
            paged_view(caches["layers.0.attn"], lay)
        return
    logical = {name: fill(kv, lay, seed) for seed, (name, kv) in enumerate(caches.items())}
    for name, kv in caches.items():  # every layer: its own memory, read where the backend reads it
        view = paged_view(kv, lay)
        assert view.shape == (NB, 2, block, heads, D)
        assert torch.equal(view, logical[name])
    view[NB - 1, 1, block - 1, heads - 1, D - 1] = 42.0  # a view, not a copy
    assert backend_blocks(kv, lay)[NB - 1, 1, block - 1, heads - 1, D - 1] == 42.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout,heads,block,kernel", READ)
def test_codecs_round_trip(layout, heads, block, kernel, device):
    lay, caches = setup(layout, heads, block, kernel, device)
    src_kv, dst_kv = caches.values()
    logical = fill(src_kv, lay, 0)
    src, dst = paged_view(src_kv, lay), paged_view(dst_kv, lay)
    ids = torch.tensor([3, 0, 2], device=device)
    canon = logical[ids].cpu()  # the blocks as a plain [n, 2, T, H, D] tensor: the reference's input
    for name in ("raw", "int4h"):
        codec = get_codec(name, lay)
        got = torch.empty(3, codec.layer_bytes, dtype=torch.uint8, device=device)
        want = torch.empty(3, codec.layer_bytes, dtype=torch.uint8)
        codec.encode(src, ids, got)
        codec.encode(canon, torch.arange(3), want)  # the torch reference
        assert torch.equal(got.cpu(), want)
        dst_kv.zero_()
        codec.decode(got, dst, ids)
        back = backend_blocks(dst_kv, lay).cpu()
        expect = torch.zeros_like(canon)
        codec.decode(want, expect, torch.arange(3))
        assert torch.equal(back[[3, 0, 2]].view(torch.int16), expect.view(torch.int16))
        assert not back[1].any()  # the block not loaded stays as it was
        if name == "raw":
            assert torch.equal(want.view(torch.bfloat16).view(canon.shape), canon)
        else:
            err = (expect.float() - canon.float()).norm() / canon.float().norm()
            assert err < 0.12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout,heads,block,kernel", READ)
def test_partial_block_load_writes_only_the_hit_tokens(layout, heads, block, kernel, device):
    lay, caches = setup(layout, heads, block, kernel, device)
    codec = get_codec("int4h", lay)
    views = [paged_view(kv, lay) for kv in caches.values()]
    for seed, kv in enumerate(caches.values()):
        fill(kv, lay, seed)
    slab = torch.zeros(1, NUM_LAYERS * codec.layer_bytes, dtype=torch.uint8)
    slab = slab.pin_memory() if device == "cuda" else slab
    for layer, view in enumerate(views):  # block 1 of every layer into slot 0
        codec.encode(view, torch.tensor([1], device=device), slab[:, layer * codec.layer_bytes:(layer + 1) * codec.layer_bytes])
    if device == "cuda":
        torch.cuda.synchronize()  # the kernels wrote the pinned slab
    decoded = [torch.zeros(1, 2, block, heads, D, dtype=torch.bfloat16) for _ in views]
    for layer, out in enumerate(decoded):
        codec.decode(slab[:, layer * codec.layer_bytes:(layer + 1) * codec.layer_bytes], out, [0])
    pipe = LayerPipeline(codec, views, slab)
    try:
        for n in (5, block - 3):  # within the first kernel block; across kernel blocks
            guards = [fill(kv, lay, 100 + seed) for seed, kv in enumerate(caches.values())]
            pipe.start_load([(2, 0, n)])
            for layer in range(NUM_LAYERS):
                pipe.wait_layer(layer)
            assert pipe.finish_load() == []
            for kv, guard, dec in zip(caches.values(), guards, decoded):
                want = guard.clone()
                want[2, :, :n] = dec[0, :, :n].to(device)
                assert torch.equal(backend_blocks(kv, lay).view(torch.int16), want.view(torch.int16))
    finally:
        pipe.close()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("heads", [1, 2, 8])
def test_stored_bytes_decode_under_every_layout(heads, block, device):
    """A block encoded under one layout is the same bytes under any other (vLLM's six, their
    kernel-block splits, the CPU backend's): a store moves between them."""
    values = torch.randn(NB, 2, block, heads, D, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    lay = KVLayout(NUM_LAYERS, heads, D, block, "bfloat16")
    targets = [(name, None) for name in LAYOUTS] + [(name, block // 2) for name in ("LBNHC", "LBHNC")
                                                    if block == 32 and not refused(name, heads, 32, 16)]
    kvs = {f"{name}/{k or block}": vllm_caches(name, heads=heads, head_size=D, block_size=block, kernel_block_size=k,
                                               num_blocks=NB, device=device)["layers.1.attn"] for name, k in targets}
    views = {name: paged_view(kv, lay) for name, kv in kvs.items()}
    if device == "cpu":  # vLLM's CPU backend: a plain (num_blocks, H, T, 2D) tensor, K and V where it puts them
        cpu = {"cpu-plain": BlockStrides.plain(block, heads, D)}
        if hasattr(torch.ops._C, "cpu_attn_reshape_and_cache"):
            from kvplug.connectors.vllm.cpu_layout import probe_block_strides
            cpu["cpu-probed"] = probe_block_strides(lay)
        for name, strides in cpu.items():
            views[name] = paged_view(torch.zeros(NB, heads, block, 2 * D, dtype=torch.bfloat16), lay, strides)
    ids = torch.tensor([2, 0, 3], device=device)
    for codec in (get_codec("raw", lay), get_codec("int4h", lay, 32)):
        stored = {}
        for name, view in views.items():
            scatter_blocks(view, torch.arange(NB, device=device), values.to(device))
            stored[name] = torch.empty(3, codec.layer_bytes, dtype=torch.uint8, device=device)
            codec.encode(view, ids, stored[name])
        first = next(iter(stored.values())).cpu()
        assert all(torch.equal(b.cpu(), first) for b in stored.values())
        expect = torch.empty(3, 2, block, heads, D, dtype=torch.bfloat16)
        codec.decode(first, expect, torch.arange(3))
        for name, view in views.items():
            scatter_blocks(view, torch.arange(NB, device=device), torch.zeros_like(values).to(device))
            codec.decode(first.to(device), view, ids)
            got = backend_blocks(kvs[name], lay) if name in kvs else gather_blocks(view, torch.arange(NB))
            assert torch.equal(got[[2, 0, 3]].cpu().view(torch.int16), expect.view(torch.int16)), name
            assert not got[1].any(), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout,heads,block,kernel", READ)
def test_self_check_passes_and_restores_the_blocks(layout, heads, block, kernel, device):
    lay, caches = setup(layout, heads, block, kernel, device)
    for seed, kv in enumerate(caches.values()):
        fill(kv, lay, seed)
    before = {name: kv.view(torch.int16).clone() for name, kv in caches.items()}
    self_check(caches, lay, codec=get_codec("int4h", lay), vllm_layout=layout)
    for name, kv in caches.items():
        assert torch.equal(kv.view(torch.int16), before[name])


def test_self_check_refuses_misread_layouts():
    lay, caches = setup("LBHNC", 2, 16, None, "cpu")
    kv = caches["layers.1.attn"]
    plain = BlockStrides.plain(16, 2, D)
    # the CPU backend's rule on a GPU view of the same shape (LBHNC blocks are contiguous: it is accepted)
    with pytest.raises(LayoutCheckError, match=r"reads the K/V of .*shape \(4, 2, 16, 128\), strides "
                                               r"\(4096, 2048, 128, 1\).*vLLM layout LBHNC"):
        self_check(caches, lay, view_fn=lambda t: paged_view(t, lay, plain), vllm_layout="LBHNC")

    def swapped(t):  # K and V halves exchanged
        view = paged_view(t, lay)
        return SplitKV(view[:, 1], view[:, 0])
    with pytest.raises(LayoutCheckError, match=r"reads the K/V of 8192 of 8192 elements wrongly"):
        self_check(kv, lay, view_fn=swapped)
    # b12x's K/V planes read into a kv_last cache (2 heads: the shapes agree)
    with pytest.raises(LayoutCheckError, match="self-check failed"):
        self_check(kv, lay, view_fn=lambda t: paged_view(t, lay, kv_format=KV_PLANES))

    # LBHNC's 16-token kernel blocks merged as if their tokens followed each other
    lay32, split = setup("LBHNC", 2, 32, 16, "cpu")

    def naive_merge(t):
        st = t.stride()
        return t.as_strided((NB, 2, 32, 2, D), (2 * st[0], D, st[2], st[1], 1), t.storage_offset())
    with pytest.raises(LayoutCheckError, match="reads the token of"):
        self_check(split, lay32, view_fn=naive_merge)


@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC", "LHBNC", "BLNHC"])
def test_kv_planes_caches(layout):
    """b12x's [B, 2, N, H*D] views: its spec says so, and they read as its split."""
    lay, caches = setup(layout, 2, 16, None, "cpu", kv_format=KV_PLANES)
    assert kv_format_of(attention_spec(2, D, 16, kv_format=KV_PLANES)) == KV_PLANES
    assert kv_format_of(attention_spec(2, D, 16)) == KV_LAST
    kv = caches["layers.1.attn"]
    logical = fill(kv, lay, 0, KV_PLANES)
    assert torch.equal(paged_view(kv, lay, kv_format=KV_PLANES), logical)
    self_check(caches, lay, kv_format=KV_PLANES, codec=get_codec("int4h", lay))


def test_kv_format_refuses_other_packings():
    from dataclasses import replace

    nvfp4 = replace(attention_spec(2, D, 16), num_head_slots=4, state_content_bytes=40)  # FlashInfer's 2H slots
    with pytest.raises(ValueError, match="4 head slots of 40 bytes"):
        kv_format_of(nvfp4)


@pytest.mark.skipif(not hasattr(torch.ops._C, "cpu_attn_reshape_and_cache"), reason="this vLLM build has no CPU attention ops")
def test_self_check_on_the_cpu_backend_tags_through_vllms_cache_write():
    from kvplug.connectors.vllm.cpu_layout import probe_block_strides

    lay = KVLayout(NUM_LAYERS, 2, D, 32, "bfloat16")
    kv = torch.randn(NB, 2, 32, 2 * D).to(torch.bfloat16)
    before = kv.clone()
    self_check(kv, lay, cpu_strides=probe_block_strides(lay), codec=get_codec("int4h", lay))
    assert torch.equal(kv.view(torch.int16), before.view(torch.int16))
    if probe_block_strides(lay) != BlockStrides.plain(32, 2, D):  # this ISA does not keep K as [T, D]
        with pytest.raises(LayoutCheckError, match="vLLM's CPU backend"):
            self_check(kv, lay, cpu_strides=BlockStrides.plain(32, 2, D))
