"""The connector's two halves driven by hand, with fake requests: no engine.

A step here is what vLLM does: the scheduler half builds the metadata, the
worker half loads before the forward pass and saves each layer after it, then
its results go back to the scheduler half.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest
import torch

from kvplug.codec import Codec, get_codec
from kvplug.config import KVPlugConfig
from kvplug.connectors.vllm.geometry import Geometry
from kvplug.connectors.vllm.scheduler import SchedulerHalf
from kvplug.connectors.vllm.worker import WorkerHalf
from kvplug.keys import fingerprint
from kvplug.layout import KVLayout
from vllm_caches import vllm_caches

T, H, D, LAYERS, NUM_BLOCKS = 16, 2, 8, 2, 32
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]


class FakeRequest(SimpleNamespace):
    __hash__ = object.__hash__  # keyed by identity, as vLLM's requests are


class Engine:
    """Both halves plus a fake paged KV cache and a trivial block allocator."""

    def __init__(self, tmp_path, name="slab", device="cpu", tp=1, kv_events=False, vllm_layout="LBNHC", **config):
        layout = KVLayout(LAYERS, H, D, T, "bfloat16")  # H: one rank's heads
        cfg = KVPlugConfig.from_dict({"cpu_bytes": "4MiB", "shm_dir": str(tmp_path), **config})
        codec = get_codec(cfg.codec, layout)
        root = fingerprint("m", layout.describe(), cfg.codec, world_size=tp)
        self.geo = Geometry(layout, tuple(NAMES), codec, root, tp)
        self.sched = SchedulerHalf(cfg, self.geo, engine_id=name, kv_events=kv_events)
        # One worker per tensor-parallel rank, each with its own paged KV as vLLM 0.32's GPU
        # runner hands it: [B, H, N, 2D] views made by vLLM's allocate_kv_cache for a
        # KVCacheLayout (default LBNHC). The forward pass writes through the attention
        # backends' split of it (K = [..., :D], V = [..., D:]), here as one [B, 2, N, H, D] view.
        self.workers = [WorkerHalf(cfg, self.geo, rank) for rank in range(tp)]
        self.caches = [{n: kv for n, kv in zip(NAMES, vllm_caches(vllm_layout, heads=H, head_size=D, block_size=T,
                                                                  num_blocks=NUM_BLOCKS, num_layers=LAYERS,
                                                                  device=device).values())} for _ in range(tp)]
        self.kvs = [{n: backend_view(kv) for n, kv in caches.items()} for caches in self.caches]
        for worker, caches in zip(self.workers, self.caches):
            worker.register_kv_caches(caches)
        self.worker, self.kv = self.workers[0], self.kvs[0]
        self.reporting = set(range(tp))  # ranks whose step results reach the scheduler half
        self.blocks: dict[str, list[int]] = {}
        self._free = list(range(1, NUM_BLOCKS))
        self.sched.bind_kv_cache_manager(SimpleNamespace(get_block_ids=lambda rid: (self.blocks[rid],)))

    def request(self, rid: str, tokens: list[int]):
        req = FakeRequest(request_id=rid, all_token_ids=list(tokens), num_tokens=len(tokens),
                              num_computed_tokens=0, prompt_embeds=None, mm_features=[], lora_request=None,
                              cache_salt=None, block_hashes=fake_block_hashes(tokens))
        self.blocks[rid] = [self._free.pop(0) for _ in range(-(-len(tokens) // T))]
        return req

    def schedule(self, req) -> int:
        """Lookup + allocation, as vLLM's scheduler does for a waiting request."""
        n, load_async = self.sched.get_num_new_matched_tokens(req, 0)
        assert load_async is False
        if n is None:
            return -1
        self.sched.update_state_after_alloc(req, SimpleNamespace(get_block_ids=lambda: (self.blocks[req.request_id],)), n)
        req.num_computed_tokens = n
        return n

    def step(self, scheduled: dict, fill: bool = True):
        """One engine step computing `scheduled` {req: tokens}; returns the worker's outputs."""
        with torch.inference_mode():  # as vLLM runs its steps
            return self._step(scheduled, fill)

    def _step(self, scheduled: dict, fill: bool):
        out = SimpleNamespace(num_scheduled_tokens={r.request_id: n for r, n in scheduled.items()},
                              total_num_scheduled_tokens=sum(scheduled.values()), kv_connector_block_state=None)
        meta = self.sched.build_connector_meta(out)
        results = []
        for rank, (worker, kv) in enumerate(zip(self.workers, self.kvs)):
            worker.start_load(meta)
            for name in NAMES:
                worker.wait_for_layer(name)
                if fill:  # the forward pass writes the KV of the tokens it computes
                    for req, n in scheduled.items():
                        for pos in range(req.num_computed_tokens, req.num_computed_tokens + n):
                            block = self.blocks[req.request_id][pos // T]
                            kv[name][block, :, pos % T] = kv_value(req.all_token_ids[:pos + 1], name, rank)
                worker.save_layer(name, meta)
            worker.wait_for_save(meta)
            results.append((worker.get_finished(), worker.load_errors(), worker.take_worker_meta()))
        # As vLLM's KVOutputAggregator: worker metadata aggregated, a request
        # finished once every rank says so, load errors from any rank.
        results = [r for rank, r in enumerate(results) if rank in self.reporting]
        finished = set.intersection(*(r[0] for r in results))
        errors = set().union(*(r[1] for r in results))
        metas = [r[2] for r in results if r[2] is not None]
        wm = metas[0] if metas else None
        for m in metas[1:]:
            wm = wm.aggregate(m)
        self.sched.update_connector_output(SimpleNamespace(kv_connector_worker_meta=wm, finished_sending=finished))
        for req, n in scheduled.items():
            req.num_computed_tokens += n
        return meta, finished, errors

    def kv_of(self, req, pos: int, name: str = NAMES[-1], rank: int = 0) -> torch.Tensor:
        return self.kvs[rank][name][self.blocks[req.request_id][pos // T], :, pos % T]

    def close(self):
        for worker in self.workers:
            worker.shutdown()
        self.sched.shutdown()


def backend_view(kv: torch.Tensor) -> torch.Tensor:
    """vLLM's [B, H, N, 2D] view as [B, 2 (K, V), N, H, D]: what flash_attn's
    ``kv.transpose(1, 2).split(D, -1)`` reads, over the same memory."""
    sb, sh, sn, sd = kv.stride()
    return kv.as_strided((kv.shape[0], 2, T, H, D), (sb, D * sd, sn, sh, sd), kv.storage_offset())


def fake_block_hashes(tokens: list[int]) -> list[bytes]:
    """Stand-ins for vLLM's per-request block hashes: one per full block, chained."""
    out = []
    for i in range(len(tokens) // T):
        out.append(hashlib.sha256((out[-1] if out else b"") + repr(tokens[i * T:(i + 1) * T]).encode()).digest())
    return out


def kv_value(prefix: list[int], name: str, rank: int = 0) -> torch.Tensor:
    """The KV a model would compute at a position: a function of the prefix (and layer, and rank's heads)."""
    g = torch.Generator().manual_seed(hash((tuple(prefix), name, rank)) % (2**31))
    return torch.randn(2, H, D, generator=g).to(torch.bfloat16)


def fail_decoding(monkeypatch, block_id: int) -> None:
    """Make decoding into vLLM block `block_id` raise, as a bad read would."""
    decode = Codec.decode

    def failing(self, src, kv_view, block_ids):
        if block_id in torch.as_tensor(block_ids).tolist():
            raise OSError("disk on fire")
        return decode(self, src, kv_view, block_ids)

    monkeypatch.setattr(Codec, "decode", failing)


def fail_encoding(monkeypatch) -> None:
    def failing(self, kv_view, block_ids, out):
        raise OSError("slab on fire")

    monkeypatch.setattr(Codec, "encode", failing)


@pytest.fixture(params=DEVICES)
def engine(tmp_path, request):
    e = Engine(tmp_path, device=request.param)
    yield e
    e.close()


def test_a_stored_prompt_is_loaded_back_exactly(engine):
    tokens = list(range(100, 140))  # 2 full blocks + 8
    a = engine.request("a", tokens)
    assert engine.schedule(a) == 0
    engine.step({a: len(tokens)})
    assert engine.sched.request_finished(a, engine.blocks["a"]) == (True, None)  # its tail is saved next step
    a.num_computed_tokens = len(tokens)
    _, finished, _ = engine.step({})
    assert finished == {"a"}

    b = engine.request("b", tokens)
    assert engine.schedule(b) == len(tokens) - 1  # all but the last token
    meta, _, errors = engine.step({b: 1})
    assert not errors and [len(j.block_ids) for j in meta.loads] == [3]
    for pos in range(len(tokens)):
        for name in NAMES:
            assert torch.equal(engine.kv_of(b, pos, name), engine.kv_of(a, pos, name))


def test_tensor_parallel_ranks_each_get_their_own_shard_back(tmp_path):
    e = Engine(tmp_path, tp=2)
    try:
        tokens = list(range(100, 148))  # 3 full blocks
        a = e.request("a", tokens)
        e.schedule(a)
        e.step({a: len(tokens)})
        assert e.sched.stats.data["stored_blocks"] == 3
        b = e.request("b", tokens + [5, 6])
        assert e.schedule(b) == 48
        _, _, errors = e.step({b: 2})
        assert not errors
        for rank in (0, 1):
            assert not torch.equal(e.kv_of(a, 0, rank=0), e.kv_of(a, 0, rank=1))  # the shards differ
            for pos in range(48):
                for name in NAMES:
                    assert torch.equal(e.kv_of(b, pos, name, rank), e.kv_of(a, pos, name, rank))
    finally:
        e.close()


def test_a_block_is_stored_only_once_every_rank_wrote_its_shard(tmp_path):
    e = Engine(tmp_path, tp=2)
    try:
        e.reporting = {0}  # rank 1's results have not reached the scheduler yet
        a = e.request("a", list(range(100, 132)))
        e.schedule(a)
        e.step({a: 32})
        assert e.sched.stats.data.get("stored_blocks", 0) == 0
        assert e.schedule(e.request("b", list(range(100, 132)) + [9])) == 0
    finally:
        e.close()


def test_kv_events_announce_saved_blocks_under_vllms_hashes(tmp_path):
    from vllm.distributed.kv_events import BlockRemoved, BlockStored
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash as ext  # as vLLM publishes its own

    e = Engine(tmp_path, kv_events=True, cpu_bytes="48KiB")  # room for a few blocks only
    try:
        tokens = list(range(100, 148))  # 3 full blocks
        a = e.request("a", tokens)
        e.schedule(a)
        e.step({a: 48})
        events = e.sched.take_events()
        hashes = [ext(h) for h in a.block_hashes]
        assert [(type(ev), ev.block_hashes, ev.parent_block_hash, ev.token_ids, ev.medium) for ev in events] == [
            (BlockStored, [hashes[i]], hashes[i - 1] if i else None, tokens[i * T:(i + 1) * T], "CPU")
            for i in range(3)]
        assert e.sched.take_events() == []  # taken once
        # Other prompts push a's blocks out of the small CPU tier: each is announced gone, once.
        for k in range(4):
            b = e.request(f"b{k}", list(range(1000 * (k + 1), 1000 * (k + 1) + 48)))
            e.schedule(b)
            e.step({b: 48})
        removed = [h for ev in e.sched.take_events() if isinstance(ev, BlockRemoved) for h in ev.block_hashes]
        assert set(hashes) <= set(removed) and len(removed) == len(set(removed))
    finally:
        e.close()


def test_no_kv_events_unless_asked(engine):
    a = engine.request("a", list(range(100, 132)))
    engine.schedule(a)
    engine.step({a: 32})
    assert engine.sched.take_events() == [] and engine.sched.store.take_events() == []


def test_hit_ends_mid_block_at_the_last_shared_token(engine):
    a = engine.request("a", list(range(100, 148)))  # 3 full blocks
    engine.schedule(a)
    engine.step({a: 48})
    b = engine.request("b", list(range(100, 120)) + [7] * 20)  # shares 20 tokens: 1 block + 4
    assert engine.schedule(b) == 20
    engine.step({b: 20})
    for pos in range(20):
        assert torch.equal(engine.kv_of(b, pos), engine.kv_of(a, pos))


def test_blocks_computed_by_two_requests_in_one_step_are_stored_once(engine):
    prefix = list(range(200, 232))  # 2 blocks
    a = engine.request("a", prefix + [1, 2, 3])
    b = engine.request("b", prefix + [4, 5, 6])
    engine.schedule(a), engine.schedule(b)
    meta, _, _ = engine.step({a: 35, b: 35})
    assert [(j.req_id, len(j.slots)) for j in meta.saves] == [("a", 2)]
    assert engine.sched.stats.data["stored_blocks"] == 2
    assert engine.sched.stats.data["store_skipped_blocks"] == 2


def test_a_failed_load_is_reported_and_not_stored_over(engine, monkeypatch):
    tokens = list(range(300, 348))  # 3 full blocks
    a = engine.request("a", tokens)
    engine.schedule(a)
    engine.step({a: 48})
    b = engine.request("b", tokens + [9, 9])
    assert engine.schedule(b) == 48
    fail_decoding(monkeypatch, engine.sched._planned[0].plan.block_ids[1])
    _, _, errors = engine.step({b: 2})
    assert errors == {engine.blocks["b"][1]}
    st = engine.sched._reqs["b"]
    assert st.next_block == 1  # vLLM recomputes from block 1: those blocks get stored again later


def test_save_over_a_failed_load_is_aborted(engine, monkeypatch):
    a = engine.request("a", list(range(400, 432)))  # 2 blocks
    engine.schedule(a)
    engine.step({a: 32})
    b = engine.request("b", list(range(400, 432)) + list(range(500, 520)))  # + 1 new full block + 4
    engine.schedule(b)
    fail_decoding(monkeypatch, engine.sched._planned[0].plan.block_ids[0])
    engine.step({b: 20})  # computes block 2 on top of a failed block 0
    assert engine.sched.stats.data["aborted_blocks"] == 1
    c = engine.request("c", list(range(400, 432)) + list(range(500, 520)) + [1])
    assert engine.schedule(c) == 32  # block 2 was not stored


def test_a_save_the_worker_could_not_write_is_never_visible(engine, monkeypatch):
    a = engine.request("a", list(range(800, 832)))
    engine.schedule(a)
    fail_encoding(monkeypatch)
    engine.step({a: 32})
    assert engine.sched.stats.data["aborted_blocks"] == 2
    monkeypatch.undo()
    b = engine.request("b", list(range(800, 832)) + [1])
    assert engine.schedule(b) == 0


def test_request_without_saves_is_freed_at_once(engine):
    a = engine.request("a", [5] * 10)  # no full block, tail stored at finish
    engine.schedule(a)
    engine.step({a: 10})
    engine.sched.config = engine.sched.config.replace(store_partial_blocks=False)
    assert engine.sched.request_finished(a, engine.blocks["a"]) == (False, None)
    assert "a" not in engine.sched._reqs


def test_unfinished_lookup_pins_are_released(engine):
    a = engine.request("a", list(range(32)))
    engine.schedule(a)
    engine.step({a: 32})
    b = engine.request("b", list(range(32)) + [1])
    engine.sched.get_num_new_matched_tokens(b, 0)  # pinned, then vLLM never schedules it
    assert engine.sched.store.stats()["cpu"]["pinned_blocks"] == 2
    engine.sched.request_finished(b, [])
    assert engine.sched.store.stats()["cpu"]["pinned_blocks"] == 0


@pytest.mark.parametrize("device", DEVICES)
def test_ssd_blocks_are_promoted_before_the_request_runs(tmp_path, device):
    ssd = str(tmp_path / "ssd")
    tokens = list(range(600, 648))
    first = Engine(tmp_path, "slab1", device, ssd_path=ssd, ssd_bytes="16MiB")
    a = first.request("a", tokens)
    first.schedule(a)
    first.step({a: 48})
    first.close()  # flushes the SSD writes

    second = Engine(tmp_path, "slab2", device, ssd_path=ssd, ssd_bytes="16MiB")
    b = second.request("b", tokens)
    n, _ = second.sched.get_num_new_matched_tokens(b, 0)
    if n is None:  # promotion in flight: vLLM asks again on a later step
        second.sched._reqs["b"].handle.wait(10)
    assert second.schedule(b) == 47
    assert second.sched.stats.data["hit_tokens_ssd"] == 47
    taken = second.sched.take_stats()  # what the step's stats carry: the SSD bytes read for b
    assert taken.data["ssd_read_bytes"] == 3 * second.sched.store.block_bytes
    assert "ssd_write_bytes" not in taken.data and second.sched.take_stats() is None  # counted once
    second.step({b: 1})
    for pos in range(47):
        assert torch.equal(second.kv_of(b, pos).cpu(), kv_value(tokens[:pos + 1], NAMES[-1]))
    second.close()


def test_auto_policy_recomputes_when_loading_is_slower(tmp_path):
    ssd = str(tmp_path / "ssd")
    tokens = list(range(900, 948))
    first = Engine(tmp_path, "slab1", ssd_path=ssd, ssd_bytes="16MiB")
    a = first.request("a", tokens)
    first.schedule(a)
    first.step({a: 48})
    first.close()
    second = Engine(tmp_path, "slab2", ssd_path=ssd, ssd_bytes="16MiB", load_policy="auto")
    second.sched.policy.observe_prefill(10**9, 1.0)   # recomputing is fast
    second.sched.policy.observe_load("ssd", 1, 10.0)  # the SSD is slow
    b = second.request("b", tokens)
    assert second.sched.get_num_new_matched_tokens(b, 0) == (0, False)
    assert second.sched.stats.data["policy_skipped_tokens"] == 47
    second.close()


def test_requests_whose_tokens_do_not_say_what_the_kv_is_are_skipped(engine):
    req = engine.request("e", [1] * 40)
    req.prompt_embeds = torch.zeros(40, 4)
    assert engine.sched.get_num_new_matched_tokens(req, 0) == (0, False)


def test_worker_rejects_caches_of_another_shape(tmp_path):
    e = Engine(tmp_path)
    with pytest.raises(ValueError, match="unrecognised paged KV shape"):
        e.worker.register_kv_caches({n: torch.zeros(4, 3, T, H, D, dtype=torch.bfloat16) for n in NAMES})
    e.close()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tp", [1, 2])
def test_int4h_blocks_come_back_close(tmp_path, device, tp):
    e = Engine(tmp_path, device=device, codec="int4h", tp=tp)
    tokens = list(range(700, 740))
    a = e.request("a", tokens)
    e.schedule(a)
    e.step({a: 40})
    b = e.request("b", tokens)
    assert e.schedule(b) == 32  # the full blocks (no finish, so no tail)
    e.step({b: 8})
    for rank in range(tp):
        for pos in range(32):
            for name in NAMES:
                want, got = e.kv_of(a, pos, name, rank).float(), e.kv_of(b, pos, name, rank).float()
                assert (got - want).norm() <= 0.15 * want.norm()
    e.close()
