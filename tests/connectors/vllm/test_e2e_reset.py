"""vLLM's reset_prefix_cache reaches kvplug, and the JSON spelling recomputes failed loads.

Reset: nothing stored before it hits after it.

vLLM 0.32: ``LLM.reset_prefix_cache(reset_running_requests=False,
reset_connector=False) -> bool``; with ``reset_connector=True`` the scheduler
calls the KV connector's ``reset_cache()`` (vLLM resets its own prefix cache
first, then the connector's; it returns False if either fails). It is what a
weight update or an operator's cache flush calls: afterwards no request may be
served KV computed before it.

One kvplug engine (CPU tier, raw codec, vLLM's prefix cache off): P1 cold, P1
warm (hit), reset, P1 (no hit: recomputed), P1 again (hit: stored anew after
the reset). Outputs are compared with the session's reference engine. The
engine prefills in chunks of 128 tokens (chunked prefill, a step budget of one
block): P1's blocks are saved as each chunk completes them, and a hit on them
gives the same output as the reference engine's one-step prefill.

The engine is spelled as vLLM's JSON kv_transfer_config without
kv_load_failure_policy, which leaves vLLM's default, "fail": a request one of
whose blocks cannot be loaded would end with an error. kvplug's blocks are a
cache, so a failed load must be recomputed whatever the spelling: P3 with the
worker unable to read the second block of its load completes with the very
same output, and P3 hits again afterwards.
"""

from __future__ import annotations

import pytest

from vllm_e2e import P1, P3, run_engine, same_output

pytestmark = pytest.mark.e2e

STEPS = [
    {"name": "p1_cold", "prompts": [P1]},
    {"name": "p1_warm", "prompts": [P1]},
    {"name": "reset", "reset_prefix_cache": {"reset_connector": True}},
    {"name": "p1_after_reset", "prompts": [P1]},
    {"name": "p1_stored_again", "prompts": [P1]},
    {"name": "p3_cold", "prompts": [P3]},
    {"name": "p3_load_error", "prompts": [P3], "fail_second_block": True},
    {"name": "p3_after_error", "prompts": [P3]},
]


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    return run_engine(tiny_model, tmp_path_factory.mktemp("e2e-reset"), "reset", STEPS,
                      kvplug={"cpu_bytes": "256MiB", "codec": "raw"}, max_num_batched_tokens=128,
                      load_failure_policy=None)


def test_chunked_prefill_saves_each_chunks_blocks(run):
    assert run["steps"]["p1_cold"]["counters"]["stored_blocks"] == 3  # 2 full blocks + the tail


def test_hit_before_reset(run, reference):
    (cold,) = run["steps"]["p1_cold"]["outputs"]
    assert cold["cached_tokens"] == 0
    same_output(cold, reference["P1"][0])
    (warm,) = run["steps"]["p1_warm"]["outputs"]
    assert warm["cached_tokens"] == len(P1) - 1
    same_output(warm, reference["P1"][0])


def test_reset_prefix_cache_with_connector_succeeds(run):
    assert run["steps"]["reset"]["reset"] is True


def test_no_hit_after_reset(run, reference):
    step = run["steps"]["p1_after_reset"]
    (out,) = step["outputs"]
    assert out["cached_tokens"] == 0
    assert step["counters"].get("hit_tokens", 0) == 0
    same_output(out, reference["P1"][0])


def test_prompt_is_stored_again_after_reset(run, reference):
    (out,) = run["steps"]["p1_stored_again"]["outputs"]
    assert out["cached_tokens"] == len(P1) - 1
    same_output(out, reference["P1"][0])


def test_engine_left_vllms_default_policy(run):
    # vLLM logs the config it was given (before any connector could touch it).
    (args,) = [line for line in run["log"].splitlines() if "non-default args:" in line]
    assert "kv_load_failure_policy='fail'" in args
    (cold,) = run["steps"]["p3_cold"]["outputs"]
    assert cold["cached_tokens"] == 0


def test_load_error_is_recomputed_without_failure_policy(run, reference):
    step = run["steps"]["p3_load_error"]
    assert step["counters"]["load_failed_blocks"] == 1
    (out,) = step["outputs"]
    assert out["finish_reason"] == "length"  # not "error"
    same_output(out, reference["P3"][0])
    assert "Recovered from KV load failure" in run["log"]


def test_store_still_serves_after_load_error(run, reference):
    (after,) = run["steps"]["p3_after_error"]["outputs"]
    assert after["cached_tokens"] == len(P3) - 1
    same_output(after, reference["P3"][0])
