"""kvplug in a real vLLM engine, CPU tier, raw codec: hits give the very same output.

One engine runs all steps in order; each test checks one of them against the
reference engine (no kvplug). vLLM's prefix cache is off, so every cached
token below is a kvplug hit.
"""

from __future__ import annotations

import pytest

from vllm_e2e import BLOCK, P1, P2, P3, SHARED, free_port, run_engine, same_output

pytestmark = pytest.mark.e2e

STEPS = [
    {"name": "p1_cold", "prompts": [P1]},
    {"name": "p1_warm", "prompts": [P1]},
    {"name": "p2_mid_block", "prompts": [P2]},
    {"name": "shared_cold", "prompts": SHARED},
    {"name": "shared_warm", "prompts": SHARED},
    {"name": "p3_cold", "prompts": [P3]},
    {"name": "p3_load_error", "prompts": [P3], "fail_second_block": True},
    {"name": "p3_after_error", "prompts": [P3]},
]


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    return run_engine(tiny_model, tmp_path_factory.mktemp("e2e-cpu"), "cpu", STEPS,
                      kvplug={"cpu_bytes": "256MiB", "codec": "raw"}, kv_events_port=free_port())


def test_cold_run_misses_and_matches_reference(run, reference):
    (out,) = run["steps"]["p1_cold"]["outputs"]
    assert out["cached_tokens"] == 0
    same_output(out, reference["P1"][0])


def test_saved_blocks_are_announced_as_kv_events(run):
    # vLLM publishes kvplug's events beside its own (ZMQ): one BlockStored, medium
    # CPU, per full block the cold run saved (the partial tail has no vLLM hash).
    stored = [e for e in run["steps"]["p1_cold"]["kv_events"] if e["type"] == "BlockStored" and e["medium"] == "CPU"]
    assert [e["token_ids"] for e in stored] == [P1[i * BLOCK:(i + 1) * BLOCK] for i in range(len(P1) // BLOCK)]
    assert all(e["hashes"] == 1 for e in stored)


def test_whole_prompt_restored_from_cpu_tier(run, reference):
    step = run["steps"]["p1_warm"]
    (out,) = step["outputs"]
    assert out["cached_tokens"] == len(P1) - 1  # the last prompt token is always computed
    assert step["counters"]["hit_tokens_cpu"] == len(P1) - 1
    same_output(out, reference["P1"][0])


def test_shared_prefix_ending_mid_block_hits_to_the_token(run, reference):
    step = run["steps"]["p2_mid_block"]
    (out,) = step["outputs"]
    assert out["cached_tokens"] == 200  # P2 shares P1's first 200 tokens: 1 block + 72 of the next
    same_output(out, reference["P2"][0])


def test_common_prefix_of_concurrent_requests_is_stored_once(run, reference):
    cold = run["steps"]["shared_cold"]
    # 3 prefix blocks once + one partial tail per request. The other requests' copies
    # of the prefix are not stored again: either they were in flight in the same step
    # (prepare_store deduplicates) or, when vLLM prefills one request per step, they
    # hit the blocks the first one stored.
    assert cold["counters"]["stored_blocks"] == 3 + len(SHARED)
    assert cold["counters"]["store_skipped_blocks"] == 3 * (len(SHARED) - 1)
    warm = run["steps"]["shared_warm"]
    for out, ref in zip(warm["outputs"], reference["SHARED"]):
        assert out["cached_tokens"] == len(SHARED[0]) - 1
        same_output(out, ref)


def test_load_error_is_recomputed(run, reference):
    step = run["steps"]["p3_load_error"]
    assert step["counters"]["load_failed_blocks"] == 1
    assert "Recovered from KV load failure" in run["log"]
    (out,) = step["outputs"]
    same_output(out, reference["P3"][0])
    # The store was not poisoned: the next run hits all of it again.
    (after,) = run["steps"]["p3_after_error"]["outputs"]
    assert after["cached_tokens"] == len(P3) - 1
    same_output(after, reference["P3"][0])

