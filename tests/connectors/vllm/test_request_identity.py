"""A block is loaded only for a request of the identity it was stored under.

The halves driven by hand (test_halves.Engine): LoRA adapters (and their
files), cache salts, skipped requests, request ids reused, the cache epoch,
and the parts of vLLM's contract that decide when results arrive.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from kvplug.config import KVPlugConfig
from kvplug.connectors.vllm.connector import KVPlugConnector, _apply_load_failure_policy
from kvplug.connectors.vllm.request_state import IllegalTransition, LoadPhase
from test_halves import NAMES, Engine, fail_decoding


@pytest.fixture
def engine(tmp_path):
    e = Engine(tmp_path)
    yield e
    e.close()


def adapter(tmp_path, name: str, content: bytes = b"weights") -> SimpleNamespace:
    path = tmp_path / f"lora-{name}"
    path.mkdir(exist_ok=True)
    (path / "adapter_model.safetensors").write_bytes(content)
    (path / "adapter_config.json").write_text('{"r": 8}')
    return SimpleNamespace(lora_name=name, lora_path=str(path), lora_int_id=1, adapter_id=1, name=name)


def serve(engine, rid, tokens, lora=None, salt=None) -> int:
    """Look up, then compute the rest of the prompt (stores it); the hit length."""
    req = engine.request(rid, tokens)
    req.lora_request, req.cache_salt = lora, salt
    hit = engine.schedule(req)
    engine.step({req: len(tokens) - hit})
    return hit


PROMPT = list(range(100, 148))  # 3 full blocks


def test_a_lora_request_never_loads_base_model_kv_and_finds_its_own(engine, tmp_path):
    a = adapter(tmp_path, "a")
    assert serve(engine, "base", PROMPT) == 0
    assert serve(engine, "lora1", PROMPT, lora=a) == 0  # the base model's blocks are not its KV
    assert serve(engine, "lora2", PROMPT, lora=a) == len(PROMPT) - 1  # its own saves are found
    assert serve(engine, "other", PROMPT, lora=adapter(tmp_path, "b")) == 0
    assert serve(engine, "base2", PROMPT) == len(PROMPT) - 1


def test_an_adapter_rewritten_in_place_is_another_identity(engine, tmp_path):
    a = adapter(tmp_path, "a")
    serve(engine, "r1", PROMPT, lora=a)
    adapter(tmp_path, "a", content=b"new weights, same name and path")
    assert serve(engine, "r2", PROMPT, lora=a) == 0


def test_cache_salts_keep_tenants_apart_both_ways(engine):
    serve(engine, "plain", PROMPT)
    assert serve(engine, "x1", PROMPT, salt="x") == 0
    assert serve(engine, "x2", PROMPT, salt="x") == len(PROMPT) - 1
    assert serve(engine, "y", PROMPT, salt="y") == 0
    assert serve(engine, "plain2", PROMPT) == len(PROMPT) - 1


@pytest.mark.parametrize("field,value,counter", [
    ("prompt_embeds", torch.zeros(48, 4), "skipped_prompt_embeds"),
    ("mm_features", [object()], "skipped_multimodal"),
])
def test_requests_kvplug_cannot_key_are_neither_stored_nor_loaded(engine, field, value, counter):
    req = engine.request("e", PROMPT)
    setattr(req, field, value)
    assert engine.schedule(req) == 0
    meta, _, _ = engine.step({req: len(PROMPT)})
    assert meta.saves == [] and engine.sched.stats.data[counter] == 1
    assert engine.sched.request_finished(req, engine.blocks["e"]) == (False, None)
    assert serve(engine, "plain", PROMPT) == 0  # nothing was stored


def test_a_lora_adapter_whose_files_cannot_be_read_is_skipped(engine, tmp_path):
    gone = SimpleNamespace(lora_name="hub/adapter", lora_path=str(tmp_path / "not-here"), lora_int_id=2)
    assert serve(engine, "r", PROMPT, lora=gone) == 0
    assert engine.sched.stats.data["skipped_lora_unreadable"] == 1


def test_a_reused_request_id_gets_a_fresh_state(engine):
    serve(engine, "same", PROMPT)
    assert serve(engine, "same", list(range(500, 548))) == 0  # another prompt under the same id
    assert serve(engine, "x", list(range(500, 548))) == len(PROMPT) - 1  # ...was keyed as itself


def test_reset_cache_makes_every_stored_block_unreachable(engine):
    serve(engine, "a", PROMPT)
    assert engine.sched.reset_cache() is True
    assert serve(engine, "b", PROMPT) == 0
    assert serve(engine, "c", PROMPT) == len(PROMPT) - 1  # stored again, under the new epoch


def test_reset_cache_is_refused_while_a_load_is_planned(engine):
    serve(engine, "a", PROMPT)
    b = engine.request("b", PROMPT)
    engine.schedule(b)  # planned: goes out with the next step
    assert engine.sched.reset_cache() is False
    engine.step({b: 1})
    assert engine.sched.reset_cache() is True


def test_the_epoch_survives_a_restart_with_an_ssd_tier(tmp_path):
    ssd = {"ssd_path": str(tmp_path / "ssd"), "ssd_bytes": "16MiB"}
    first = Engine(tmp_path, "one", **ssd)
    serve(first, "a", PROMPT)
    first.sched.store.flush()
    assert first.sched.reset_cache() is True
    first.close()
    second = Engine(tmp_path, "two", **ssd)
    req = second.request("b", PROMPT)
    assert second.sched.get_num_new_matched_tokens(req, 0) == (0, False)
    second.close()


def test_saves_in_flight_at_a_reset_never_become_visible(engine):
    a = engine.request("a", PROMPT)
    engine.schedule(a)
    meta = engine.sched.build_connector_meta(SimpleNamespace(
        num_scheduled_tokens={"a": 48}, total_num_scheduled_tokens=48, kv_connector_block_state=None))
    assert len(meta.saves) == 1
    assert engine.sched.reset_cache() is True
    job = meta.saves[0].job_id
    engine.sched._on_worker_meta(SimpleNamespace(attached=0, failed={}, unsaved=[], done={job: 1}))
    assert engine.sched.stats.data["aborted_blocks"] == 3
    assert serve(engine, "b", PROMPT) == 0


def test_a_failed_load_poisons_saves_of_another_request_over_the_same_block(engine, monkeypatch):
    serve(engine, "a", PROMPT[:32])  # blocks 0-1 stored
    b = engine.request("b", PROMPT + [1])
    assert engine.schedule(b) == 32
    # c took a prefix-cache hit on b's blocks 0-1 in the same step (vLLM shares them) and
    # computes block 2 of its own prompt on top of them.
    c = engine.request("c", PROMPT + [2])
    engine.blocks["c"][:2] = engine.blocks["b"][:2]
    c.num_computed_tokens = 32
    engine.sched._state(c, 32).next_block = 2
    fail_decoding(monkeypatch, engine.blocks["b"][0])
    meta, _, errors = engine.step({b: 1, c: 17})
    assert errors == {engine.blocks["b"][0]}
    assert [s.req_id for s in meta.saves] == ["c"]
    assert engine.sched.stats.data["aborted_blocks"] == 1  # c's block 2: computed over the bad block
    # vLLM may keep c's KV as computed (it only rolls back the load's owner): c never saves again.
    assert engine.sched._reqs["c"].tainted and not engine.sched._reqs["b"].tainted
    meta, _, _ = engine.step({c: 1})
    assert meta.saves == []
    assert engine.sched._reqs["b"].next_block == 0  # b, the owner, is recomputed from block 0: saved again


def test_results_asked_for_before_wait_for_save_arrive_in_a_later_step(engine):
    # With speculative decoding vLLM asks for get_finished / load errors / worker metadata
    # before wait_for_save: a save is reported only once written, then in the next answer.
    a = engine.request("a", PROMPT)
    engine.schedule(a)
    out = SimpleNamespace(num_scheduled_tokens={"a": 48}, total_num_scheduled_tokens=48, kv_connector_block_state=None)
    meta = engine.sched.build_connector_meta(out)
    w = engine.worker
    with torch.inference_mode():
        w.start_load(meta)
        for name in NAMES:
            w.save_layer(name, meta)
        assert w.get_finished() == set() and w.load_errors() == set()
        early = w.take_worker_meta()
        assert early is None or not early.done  # the save is not written yet: not reported
        w.wait_for_save(meta)
    late = w.take_worker_meta()
    assert late.done == {meta.saves[0].job_id: 1}


def test_released_request_waits_for_its_saves_in_either_order(engine):
    a = engine.request("a", PROMPT[:40])
    engine.schedule(a)
    engine.step({a: 40})
    assert engine.sched.request_finished(a, engine.blocks["a"]) == (True, None)  # its tail is saved next
    out = SimpleNamespace(num_scheduled_tokens={}, total_num_scheduled_tokens=0, kv_connector_block_state=None)
    meta = engine.sched.build_connector_meta(out)
    assert meta.release == ["a"] and len(meta.saves) == 1
    w = engine.worker
    with torch.inference_mode():
        w.start_load(meta)
        assert w.get_finished() == set()  # its tail is not written yet
        w.wait_for_save(meta)
    assert w.get_finished() == {"a"}


def test_load_phases_only_move_along_checked_transitions(engine):
    st = engine.sched._state(engine.request("a", PROMPT), 0)
    with pytest.raises(IllegalTransition):
        st.move(LoadPhase.LOADING)
    st.move(LoadPhase.PINNED)
    with pytest.raises(IllegalTransition):
        st.move(LoadPhase.PINNED)


def test_layer_wise_transfers_require_piecewise_cuda_graphs():
    assert KVPlugConnector.requires_piecewise_for_cudagraph({}) is True
    assert KVPlugConnector.get_required_kvcache_layout(None) is None


@pytest.mark.parametrize("vllm_value,ours,want", [("fail", "recompute", "recompute"), ("recompute", "recompute", "recompute"),
                                                  ("fail", "fail", "fail"), ("recompute", "fail", "fail")])
def test_load_failures_follow_kvplugs_policy_in_both_spellings(vllm_value, ours, want):
    kvt = SimpleNamespace(kv_load_failure_policy=vllm_value)
    _apply_load_failure_policy(kvt, KVPlugConfig(load_failure_policy=ours))
    assert kvt.kv_load_failure_policy == want


def test_two_engines_with_one_engine_id_keep_their_own_slabs(tmp_path):
    first, second = Engine(tmp_path, "same-id"), Engine(tmp_path, "same-id")
    try:
        a, b = first.sched.store.cpu, second.sched.store.cpu
        assert a.name != b.name and a.nonce != b.nonce
        serve(first, "r", PROMPT)
        assert serve(second, "r", PROMPT) == 0  # second's workers map second's slab only
        names = sorted(os.listdir(tmp_path))
        assert a.name not in names and b.name not in names  # each unlinked its own once attached
    finally:
        first.close()
        second.close()


def test_hooks_of_layers_outside_kvplugs_group_are_skipped(engine):
    meta = engine.sched.build_connector_meta(SimpleNamespace(
        num_scheduled_tokens={}, total_num_scheduled_tokens=0, kv_connector_block_state=None))
    engine.worker.start_load(meta)
    engine.worker.wait_for_layer("model.layers.99.kv_shared_attn")  # no KeyError
    engine.worker.save_layer("model.layers.99.kv_shared_attn", meta)


def test_a_session_that_gains_multimodal_inputs_stops_saving(engine):
    a = engine.request("a", PROMPT + PROMPT)
    engine.schedule(a)
    engine.step({a: 48})
    a.mm_features = [object()]  # a streaming session appended an image
    meta, _, _ = engine.step({a: 48})
    assert meta.saves == [] and engine.sched._reqs["a"].tainted


def test_vllm_may_wait_for_blocks_held_for_saves_instead_of_preempting(engine):
    a = engine.request("a", PROMPT[:40])
    engine.schedule(a)
    engine.step({a: 40})
    assert not engine.sched.has_pending_block_frees()
    assert engine.sched.request_finished(a, engine.blocks["a"]) == (True, None)  # its tail is saved next step
    assert engine.sched.has_pending_block_frees()
    _, finished, _ = engine.step({})
    assert finished == {"a"} and not engine.sched.has_pending_block_frees()
