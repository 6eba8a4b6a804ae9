"""LayerPipeline: paged KV <-> slab slots, layer by layer (CPU path always; CUDA transports on a GPU)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from kvplug.codec import get_codec
from kvplug.layout import BlockStrides, KVLayout, paged_view
from kvplug.tiers.cpu import CPUTier
from kvplug.tiers.slots import slot_stride
from kvplug.transfer import LayerPipeline

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (side streams, pinned slab, Triton codec)")

SHAPES = {"2_nb": lambda nb, t, h, d: (2, nb, t, h, d), "nb_2": lambda nb, t, h, d: (nb, 2, t, h, d),
          "cpu_packed": lambda nb, t, h, d: (nb, h, t, 2 * d)}


def make_views(kind, lay, nb, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shape = SHAPES[kind](nb, lay.block_tokens, lay.num_kv_heads, lay.head_size)
    caches = [torch.randn(shape, generator=g).to(lay.torch_dtype).to(device) for _ in range(lay.num_layers)]
    cpu = BlockStrides.plain(lay.block_tokens, lay.num_kv_heads, lay.head_size) if kind == "cpu_packed" else None
    return caches, [paged_view(c, lay, cpu) for c in caches]


def slab_for(codec, num_slots, pin=False):
    return CPUTier.create(num_slots * slot_stride(codec.block_bytes), codec.block_bytes, pin=pin)


def same_bytes(a, b):
    return torch.equal(a.cpu().contiguous().view(torch.uint8), b.cpu().contiguous().view(torch.uint8))


class FlakyCodec:
    """Wraps a codec: decode raises whenever ``bad`` is among the block ids, optionally waits on a gate per layer."""

    def __init__(self, codec, views, bad=None, gates=None, fail_all=False):
        self.codec, self.bad, self.gates, self.fail_all = codec, bad, gates or {}, fail_all
        self.layer_of = {id(v): i for i, v in enumerate(views)}
        self.decoded: list[int] = []

    def __getattr__(self, name):
        return getattr(self.codec, name)

    def decode(self, src, kv, ids):
        layer = self.layer_of.get(id(kv))
        if layer in self.gates:
            self.gates[layer].wait(10)
        if self.fail_all or (self.bad is not None and self.bad in torch.as_tensor(ids).tolist()):
            raise RuntimeError("corrupt row")
        self.codec.decode(src, kv, ids)
        if layer is not None:
            self.decoded.append(layer)


# -- CPU ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cpu_packed", "2_nb"])
def test_cpu_round_trip_raw_bit_exact(kind):
    lay = KVLayout(3, 2, 64, 8, "bfloat16")
    codec = get_codec("raw", lay)
    _, src = make_views(kind, lay, 10, seed=0)
    src[0][4].view(torch.uint8)[0, 0, 0, :2] = 0xFF  # a NaN with a payload survives
    _, dst = make_views(kind, lay, 10, seed=1)
    before = [v.clone() for v in dst]
    with slab_for(codec, 12) as tier:
        # arbitrary slots, one run of consecutive ones; small staging: several chunks per layer
        saves = [(4, 9), (7, 2), (1, 3), (0, 4), (9, 0)]
        pipe = LayerPipeline(codec, src, tier.buffer, staging_bytes=2 * codec.layer_bytes)
        assert pipe.rows_per_chunk == 2 and pipe.transport == "cpu"
        for layer in range(lay.num_layers):
            pipe.save_layer(layer, saves)
        assert pipe.finish_saves() == []
        pipe.close()
        # the slab holds the codec's bytes at slab[slot, l * layer_bytes:...]
        row = torch.empty(1, codec.layer_bytes, dtype=torch.uint8)
        codec.encode(src[2], [7], row)
        assert torch.equal(tier.buffer[2, 2 * codec.layer_bytes:3 * codec.layer_bytes], row[0])

        target = {4: 5, 7: 6, 1: 0, 0: 8, 9: 3}  # saved block -> block it is loaded into
        loads = [(target[b], s, lay.block_tokens) for b, s in saves]
        pipe = LayerPipeline(codec, dst, tier.buffer, staging_bytes=3 * codec.layer_bytes)
        pipe.start_load(loads)
        for layer in range(lay.num_layers):
            pipe.wait_layer(layer)
        assert pipe.finish_load() == []
        pipe.close()
    for layer in range(lay.num_layers):
        for b, t in target.items():
            assert same_bytes(dst[layer][t], src[layer][b])
        for k in set(range(10)) - set(target.values()):
            assert same_bytes(dst[layer][k], before[layer][k])


def test_cpu_partial_blocks_write_only_their_tokens():
    lay = KVLayout(2, 2, 64, 8)
    codec = get_codec("raw", lay)
    _, src = make_views("nb_2", lay, 4, seed=0)
    _, dst = make_views("nb_2", lay, 4, seed=1)
    before = [v.clone() for v in dst]
    slab = torch.zeros(4, lay.num_layers * codec.layer_bytes, dtype=torch.uint8)
    pipe = LayerPipeline(codec, src, slab)
    for layer in range(lay.num_layers):
        pipe.save_layer(layer, [(0, 1), (1, 3), (2, 0)])
    pipe.finish_saves()
    pipe.close()
    pipe = LayerPipeline(codec, dst, slab)
    pipe.start_load([(3, 1, 5), (1, 3, 8), (0, 0, 1)])  # partial, full, partial
    for layer in range(lay.num_layers):
        pipe.wait_layer(layer)
    assert pipe.finish_load() == []
    pipe.close()
    for layer in range(lay.num_layers):
        for blk, srcblk, n in ((3, 0, 5), (1, 1, 8), (0, 2, 1)):
            assert same_bytes(dst[layer][blk, :, :n], src[layer][srcblk, :, :n])
            assert same_bytes(dst[layer][blk, :, n:], before[layer][blk, :, n:])
        assert same_bytes(dst[layer][2], before[layer][2])


def test_cpu_wait_layer_waits_for_that_layer_only():
    lay = KVLayout(4, 2, 64, 4)
    codec = get_codec("raw", lay)
    _, views = make_views("nb_2", lay, 3)
    slab = torch.zeros(3, lay.num_layers * codec.layer_bytes, dtype=torch.uint8)
    gate = threading.Event()
    flaky = FlakyCodec(codec, views, gates={2: gate})
    pipe = LayerPipeline(flaky, views, slab)
    pipe.start_load([(0, 0, 4), (1, 2, 4)])
    pipe.wait_layer(0)
    assert 0 in flaky.decoded
    pipe.wait_layer(1)
    assert flaky.decoded == [0, 1]  # layer 2 is held back, yet layers 0 and 1 were handed over
    time.sleep(0.05)
    assert 2 not in flaky.decoded
    gate.set()
    pipe.wait_layer(3)
    assert flaky.decoded == [0, 1, 2, 3]
    assert pipe.finish_load() == []
    pipe.close()


def test_cpu_decode_failure_reported_without_hang():
    lay = KVLayout(3, 2, 64, 4)
    codec = get_codec("raw", lay)
    _, src = make_views("nb_2", lay, 6, seed=0)
    _, dst = make_views("nb_2", lay, 6, seed=1)
    slab = torch.zeros(6, lay.num_layers * codec.layer_bytes, dtype=torch.uint8)
    saver = LayerPipeline(codec, src, slab)
    for layer in range(lay.num_layers):
        saver.save_layer(layer, [(b, b) for b in range(6)])
    assert saver.finish_saves() == []
    saver.close()

    flaky = FlakyCodec(codec, dst, bad=4)
    pipe = LayerPipeline(flaky, dst, slab, staging_bytes=4 * codec.layer_bytes)
    # block 4 fails to decode; slot 99 does not exist; block 77 does not exist
    pipe.start_load([(1, 1, 4), (4, 4, 4), (5, 5, 2), (2, 99, 4), (77, 0, 4), (3, 3, 4)])
    for layer in range(lay.num_layers):
        pipe.wait_layer(layer)
    assert pipe.finish_load() == [2, 4, 77]
    assert pipe.finish_load() == []  # reported once
    for layer in range(lay.num_layers):
        for b in (1, 3):
            assert same_bytes(dst[layer][b], src[layer][b])
        assert same_bytes(dst[layer][5, :, :2], src[layer][5, :, :2])

    broken = FlakyCodec(codec, dst, fail_all=True)
    pipe2 = LayerPipeline(broken, dst, slab)
    pipe2.start_load([(0, 0, 4), (1, 1, 4)])
    done = threading.Event()
    threading.Thread(target=lambda: ([pipe2.wait_layer(k) for k in range(lay.num_layers)], done.set()),
                     daemon=True).start()
    assert done.wait(5), "a waiter was left hanging"
    assert pipe2.finish_load() == [0, 1]
    pipe.close()
    pipe2.close()


def test_cpu_save_failure_reported():
    lay = KVLayout(2, 2, 64, 4)
    codec = get_codec("raw", lay)
    _, views = make_views("nb_2", lay, 4)
    slab = torch.zeros(4, lay.num_layers * codec.layer_bytes, dtype=torch.uint8)

    class BadEncode(FlakyCodec):
        def encode(self, kv, ids, out):
            if 2 in torch.as_tensor(ids).tolist():
                raise RuntimeError("boom")
            self.codec.encode(kv, ids, out)

    pipe = LayerPipeline(BadEncode(codec, views), views, slab)
    for layer in range(lay.num_layers):
        pipe.save_layer(layer, [(1, 0), (2, 1), (3, 2), (0, 9)])
    assert pipe.finish_saves() == [0, 2]
    row = torch.empty(1, codec.layer_bytes, dtype=torch.uint8)
    codec.encode(views[1], [3], row)
    assert torch.equal(slab[2, codec.layer_bytes:], row[0])
    pipe.close()


@pytest.mark.parametrize("kind", ["cpu_packed", "nb_2"])
def test_cpu_int4h_round_trip(kind):
    lay = KVLayout(2, 2, 64, 8)
    codec = get_codec("int4h", lay)
    _, src = make_views(kind, lay, 5, seed=0)
    _, dst = make_views(kind, lay, 5, seed=1)
    slab = torch.zeros(7, lay.num_layers * codec.layer_bytes + 100, dtype=torch.uint8)
    pipe = LayerPipeline(codec, src, slab, staging_bytes=codec.layer_bytes)
    for layer in range(lay.num_layers):
        pipe.save_layer(layer, [(0, 6), (3, 2), (4, 3)])
    pipe.finish_saves()
    pipe.close()
    pipe = LayerPipeline(codec, dst, slab, staging_bytes=codec.layer_bytes)
    pipe.start_load([(1, 6, 8), (2, 2, 8), (0, 3, 8)])
    for layer in range(lay.num_layers):
        pipe.wait_layer(layer)
    assert pipe.finish_load() == []
    pipe.close()
    for layer in range(lay.num_layers):
        # exactly what the codec gives, and within its error
        want = torch.zeros_like(dst[layer])
        buf = torch.empty(3, codec.layer_bytes, dtype=torch.uint8)
        codec.encode(src[layer], [0, 3, 4], buf)
        codec.decode(buf, want, [1, 2, 0])
        got, ref = dst[layer][[1, 2, 0]], src[layer][[0, 3, 4]]
        assert torch.equal(got, want[[1, 2, 0]])
        err = (got.float() - ref.float()).norm() / ref.float().norm()
        assert err < 0.12


def test_bad_arguments():
    lay = KVLayout(2, 2, 64, 4)
    codec = get_codec("raw", lay)
    _, views = make_views("nb_2", lay, 2)
    with pytest.raises(ValueError, match="paged views"):
        LayerPipeline(codec, views[:1], torch.zeros(2, 2 * codec.layer_bytes, dtype=torch.uint8))
    with pytest.raises(ValueError, match="slab"):
        LayerPipeline(codec, views, torch.zeros(2, codec.layer_bytes, dtype=torch.uint8))
    with pytest.raises(ValueError, match="transport"):
        LayerPipeline(codec, views, torch.zeros(2, 2 * codec.layer_bytes, dtype=torch.uint8), transport="dma")


# -- CUDA --------------------------------------------------------------------------------------

TRANSPORTS = ["batch", "batch-caller", "runs", "rows", "uva", "host"]  # -caller: issue="caller"


def _cuda_pipe(codec, views, tier, transport, **kw):
    transport, _, issue = transport.partition("-")
    try:
        return LayerPipeline(codec, views, tier.buffer, transport=transport, issue=issue or "thread", **kw)
    except (ValueError, RuntimeError) as e:
        if transport == "batch" and "cudaMemcpyBatchAsync" in str(e):
            pytest.skip(str(e))
        raise


@needs_cuda
@pytest.mark.parametrize("codec_name", ["raw", "int4h"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_cuda_round_trip(transport, codec_name):
    lay = KVLayout(4, 2, 128, 16, "bfloat16")
    codec = get_codec(codec_name, lay)
    _, src = make_views("2_nb", lay, 12, seed=0, device="cuda")
    _, dst = make_views("nb_2", lay, 12, seed=1, device="cuda")
    before = [v.clone() for v in dst]
    # 3 layers a copy: groups [0, 3) and [3, 4); 3 blocks a load chunk, several chunks
    kw = {"staging_bytes": 2 * 3 * 3 * codec.layer_bytes, "layers_per_copy": 3}
    with slab_for(codec, 16, pin=True) as tier:
        assert tier.pinned
        saves = [(4, 9), (7, 2), (1, 3), (0, 4), (9, 5), (11, 15), (3, 0)]
        pipe = _cuda_pipe(codec, src, tier, transport, **kw)
        assert pipe.transport == transport.split("-")[0] and pipe.layers_per_copy == (1 if transport == "uva" else 3)
        for layer in range(lay.num_layers):
            pipe.save_layer(layer, saves)
        assert pipe.finish_saves() == []
        pipe.close()
        ref = torch.empty(len(saves), codec.layer_bytes, dtype=torch.uint8)
        codec.encode(src[1].cpu(), [b for b, _ in saves], ref)
        got = tier.buffer[[s for _, s in saves], codec.layer_bytes:2 * codec.layer_bytes]
        if codec_name == "raw":
            assert torch.equal(got, ref)

        target = {4: 5, 7: 6, 1: 0, 0: 8, 9: 3, 11: 11, 3: 1}
        ntok = {4: 16, 7: 16, 1: 5, 0: 16, 9: 1, 11: 16, 3: 16}
        pipe = _cuda_pipe(codec, dst, tier, transport, **kw)
        pipe.start_load([(target[b], s, ntok[b]) for b, s in saves])
        out = torch.zeros(lay.num_layers, device="cuda")
        for layer in range(lay.num_layers):
            pipe.wait_layer(layer)
            out[layer] = dst[layer][5].float().sum()  # runs on the current stream after the wait, no host sync
        assert pipe.finish_load() == []
        pipe.close()
    torch.cuda.synchronize()
    for layer in range(lay.num_layers):
        for b, t in target.items():
            n = ntok[b]
            if codec_name == "raw":
                assert same_bytes(dst[layer][t, :, :n], src[layer][b, :, :n])
            else:
                a, r = dst[layer][t, :, :n].float(), src[layer][b, :, :n].float()
                assert (a - r).norm() / r.norm() < 0.12
            assert same_bytes(dst[layer][t, :, n:], before[layer][t, :, n:])
        for k in set(range(12)) - set(target.values()):
            assert same_bytes(dst[layer][k], before[layer][k])
        assert out[layer].item() == dst[layer][5].float().sum().item()


@needs_cuda
def test_cuda_auto_transport_and_unpinned_slab():
    lay = KVLayout(2, 2, 64, 16)
    codec = get_codec("raw", lay)
    _, src = make_views("nb_2", lay, 4, device="cuda")
    _, dst = make_views("nb_2", lay, 4, seed=1, device="cuda")
    with slab_for(codec, 4, pin=True) as tier:
        auto = LayerPipeline(codec, src, tier.buffer)
        assert auto.transport in ("batch", "runs", "rows") and auto.layers_per_copy == 2  # 8 KiB layer rows: all 2 layers a copy
        auto.close()
    slab = torch.zeros(4, 2 * codec.layer_bytes, dtype=torch.uint8)  # pageable
    pipe = LayerPipeline(codec, src, slab)
    assert pipe.transport == "host"
    with pytest.raises(ValueError, match="pinned"):
        LayerPipeline(codec, src, slab, transport="batch")
    for layer in range(2):
        pipe.save_layer(layer, [(0, 3), (2, 1)])
    assert pipe.finish_saves() == []
    pipe2 = LayerPipeline(codec, dst, slab)
    pipe2.start_load([(1, 3, 16), (3, 1, 16)])
    for layer in range(2):
        pipe2.wait_layer(layer)
    assert pipe2.finish_load() == []
    torch.cuda.synchronize()
    for layer in range(2):
        assert same_bytes(dst[layer][1], src[layer][0]) and same_bytes(dst[layer][3], src[layer][2])
    pipe.close()
    pipe2.close()


@needs_cuda
@pytest.mark.parametrize("transport", ["batch", "host"])
def test_cuda_decode_failure_reported(transport):
    lay = KVLayout(2, 2, 64, 16)
    codec = get_codec("raw", lay)
    _, views = make_views("nb_2", lay, 6, device="cuda")
    with slab_for(codec, 6, pin=True) as tier:
        flaky = FlakyCodec(codec, views, bad=2)
        pipe = _cuda_pipe(flaky, views, tier, transport)
        pipe.start_load([(1, 1, 16), (2, 2, 16), (3, 7, 16)])
        for layer in range(2):
            pipe.wait_layer(layer)
        assert pipe.finish_load() == [2, 3]
        pipe.close()


def test_cpu_transfer_thread_runs_on_the_cores_it_is_given():
    import os

    lay = KVLayout(2, 2, 8, 4, "bfloat16")
    codec = get_codec("raw", lay)
    _, views = make_views("nb_2", lay, 4)
    core = min(os.sched_getaffinity(0))
    with slab_for(codec, 4) as slab:
        pipe = LayerPipeline(codec, views, slab.buffer, cpus={core})
        try:
            assert pipe._load_worker.submit(os.sched_getaffinity, 0).result() == {core}
        finally:
            pipe.close()
        pipe = LayerPipeline(codec, views, slab.buffer)  # none given: the caller's cores
        try:
            assert pipe._load_worker.submit(os.sched_getaffinity, 0).result() == os.sched_getaffinity(0)
        finally:
            pipe.close()
