"""The worker half under the call orders of vLLM 0.32's real runner code.

vLLM's V2 GPU runner calls the connector through ``ActiveKVConnector``
(``v1/worker/gpu/kv_connector.py``: pre_forward, per-layer hooks, post_forward);
the V1 runners through ``KVConnectorModelRunnerMixin``, which with speculative
decoding defers ``wait_for_save`` until after the draft model. Both are driven
here as vLLM ships them (only ``get_kv_transfer_group`` is pointed at a
kvplug connector made of the test engine's worker half), on vLLM's own KV views
of every KVCacheLayout.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from types import SimpleNamespace

import pytest
import torch
import vllm.v1.worker.gpu.kv_connector as v2
import vllm.v1.worker.kv_connector_model_runner_mixin as v1
from vllm.config import VllmConfig
from vllm.forward_context import set_forward_context

from kvplug.connectors.vllm.connector import KVPlugConnector
from kvplug.connectors.vllm.worker import WorkerHalf
from test_halves import DEVICES, NAMES, T, Engine, fail_decoding, kv_value
from vllm_caches import LAYOUTS

PROMPT = list(range(100, 148))  # 3 full blocks


@pytest.fixture(scope="module")
def vllm_config():
    return VllmConfig()


class Runner:
    """One engine step at a time, through vLLM's own runner-side connector code."""

    def __init__(self, engine: Engine, vllm_config, monkeypatch, order: str):
        self.engine, self.order = engine, order
        conn = object.__new__(KVPlugConnector)  # the worker role's connector, without a vLLM engine
        conn.worker, conn.scheduler, conn._connector_metadata = engine.worker, None, None
        self.conn = conn
        for module in (v2, v1):
            monkeypatch.setattr(module, "get_kv_transfer_group", lambda: conn)
        monkeypatch.setattr(v1, "has_kv_transfer_group", lambda: True)
        self.config = vllm_config
        self.active = v2.ActiveKVConnector(vllm_config, engine.caches[0])  # registers the caches again

    def step(self, scheduled: dict, layer_hooks: bool = True):
        e = self.engine
        sched_out = SimpleNamespace(num_scheduled_tokens={r.request_id: n for r, n in scheduled.items()},
                                    total_num_scheduled_tokens=sum(scheduled.values()),
                                    kv_connector_block_state=None, finished_req_ids=set())
        meta = e.sched.build_connector_meta(sched_out)
        sched_out.kv_connector_metadata, sched_out.has_sync_kv_loads = meta, bool(meta.loads)
        with torch.inference_mode(), set_forward_context(None, self.config):
            if self.order == "v2":
                self.active.pre_forward(sched_out)
                self._forward(scheduled, meta, layer_hooks)
                self.active.finish_forward()
                output = self.active.post_forward(set())
            else:  # the V1 mixin with speculative decoding: wait_for_save after the results
                with v1.KVConnectorModelRunnerMixin._get_kv_connector_output(sched_out, defer_finalize=True) as output:
                    self._forward(scheduled, meta, layer_hooks)
                v1.KVConnectorModelRunnerMixin.finalize_kv_connector()
        e.sched.update_connector_output(output)
        for req, n in scheduled.items():
            req.num_computed_tokens += n
        return meta, output

    def _forward(self, scheduled, meta, layer_hooks: bool):
        """What the attention layers do: wait for the layer's load, write new KV, save the layer
        (a full CUDA graph replay calls no per-layer hook: layer_hooks=False)."""
        e = self.engine
        for name in NAMES:
            if layer_hooks:
                self.conn.wait_for_layer_load(name)
            for req, n in scheduled.items():
                for pos in range(req.num_computed_tokens, req.num_computed_tokens + n):
                    e.kv[name][e.blocks[req.request_id][pos // T], :, pos % T] = kv_value(req.all_token_ids[:pos + 1], name)
            if layer_hooks:
                self.conn.save_kv_layer(name, e.caches[0][name], None)


def cases():
    return [pytest.param(layout, device, marks=getattr(device, "marks", ()), id=f"{layout}-{getattr(device, 'values', [device])[0]}")
            for layout in LAYOUTS for device in DEVICES]


@pytest.mark.parametrize("order", ["v2", "v1-spec"])
@pytest.mark.parametrize("layout,device", cases())
def test_stored_blocks_load_back_exactly_in_either_runner_order(tmp_path, vllm_config, monkeypatch, layout, device, order):
    e = Engine(tmp_path, device=device, vllm_layout=layout)
    try:
        run = Runner(e, vllm_config, monkeypatch, order)
        a = e.request("a", PROMPT)
        e.schedule(a)
        run.step({a: len(PROMPT)})
        run.step({})  # v1-spec: the saves sealed after the results are reported now
        assert e.sched.stats.data["stored_blocks"] == 3
        b = e.request("b", PROMPT + [1])
        assert e.schedule(b) == len(PROMPT)
        _, output = run.step({b: 1})
        assert not output.invalid_block_ids
        for pos in range(len(PROMPT)):
            for name in NAMES:
                assert torch.equal(e.kv_of(b, pos, name), e.kv_of(a, pos, name))
    finally:
        e.close()


@pytest.mark.parametrize("order", ["v2", "v1-spec"])
def test_a_full_graph_step_without_layer_hooks_still_saves_every_layer(tmp_path, vllm_config, monkeypatch, order):
    e = Engine(tmp_path)
    try:
        run = Runner(e, vllm_config, monkeypatch, order)
        a = e.request("a", PROMPT)
        e.schedule(a)
        run.step({a: len(PROMPT)}, layer_hooks=False)
        run.step({}, layer_hooks=False)
        assert e.sched.stats.data["stored_blocks"] == 3
        b = e.request("b", PROMPT + [1])
        assert e.schedule(b) == len(PROMPT)
        run.step({b: 1})
        for pos in range(len(PROMPT)):
            for name in NAMES:
                assert torch.equal(e.kv_of(b, pos, name), e.kv_of(a, pos, name))
    finally:
        e.close()


@pytest.mark.parametrize("order", ["v2", "v1-spec"])
def test_load_errors_reach_vllm_in_the_step_of_the_load(tmp_path, vllm_config, monkeypatch, order):
    e = Engine(tmp_path)
    try:
        run = Runner(e, vllm_config, monkeypatch, order)
        a = e.request("a", PROMPT)
        e.schedule(a)
        run.step({a: len(PROMPT)})
        run.step({})
        b = e.request("b", PROMPT + [1])
        e.schedule(b)
        bad = e.blocks["b"][1]
        fail_decoding(monkeypatch, bad)
        _, output = run.step({b: 1})
        assert output.invalid_block_ids == {bad}
        assert e.sched._reqs["b"].next_block == 1
    finally:
        e.close()


def test_async_saves_never_wait_inside_the_step_and_release_only_once_written(tmp_path, vllm_config, monkeypatch):
    # As on CUDA (where a save ticket is an event): wait_for_save issues and returns; what is
    # written is reported when vLLM next asks, and a finished request is released only then.
    monkeypatch.setattr(WorkerHalf, "async_cpu_saves", True)
    e = Engine(tmp_path)
    try:
        run = Runner(e, vllm_config, monkeypatch, "v2")
        waits = []
        result = Future.result
        monkeypatch.setattr(Future, "result", lambda self, *a, **k: (waits.append(1), result(self, *a, **k))[1])
        a = e.request("a", PROMPT)
        e.schedule(a)
        run.step({a: len(PROMPT)})
        assert waits == []  # no blocking wait in a step that saved 3 blocks
        assert e.sched.request_finished(a, e.blocks["a"]) == (True, None)  # saves in flight: vLLM holds the blocks
        released, deadline = set(), time.monotonic() + 10
        while "a" not in released and time.monotonic() < deadline:  # the transfer thread finishes meanwhile
            time.sleep(0.01)
            _, output = run.step({})
            released |= output.finished_sending or set()
        assert "a" in released and e.sched.stats.data["stored_blocks"] == 4  # 3 blocks + the tail, then released
    finally:
        e.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_synchronization_inside_a_cuda_step_with_saves_or_loads(tmp_path, vllm_config, monkeypatch):
    e = Engine(tmp_path, device="cuda")
    try:
        run = Runner(e, vllm_config, monkeypatch, "v2")
        syncs = []
        for owner, name in ((torch.cuda, "synchronize"), (torch.cuda.Stream, "synchronize"),
                            (torch.cuda.Event, "synchronize")):
            original = getattr(owner, name)
            monkeypatch.setattr(owner, name, lambda *a, _o=original, _n=name, **k: (syncs.append(_n), _o(*a, **k))[1])
        a = e.request("a", PROMPT)
        e.schedule(a)
        run.step({a: len(PROMPT)})  # saves
        for _ in range(100):  # the saves land asynchronously; later steps report them
            if e.sched.stats.data.get("stored_blocks") == 3:
                break
            run.step({})
        b = e.request("b", PROMPT + [1])
        assert e.schedule(b) == len(PROMPT)
        run.step({b: 1})  # a load, then attention over it, then its results
        assert syncs == []
    finally:
        e.close()
