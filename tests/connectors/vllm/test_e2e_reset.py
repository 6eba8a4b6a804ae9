"""vLLM's reset_prefix_cache reaches kvplug: nothing stored before it hits after it.

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
"""

from __future__ import annotations

import pytest

from vllm_e2e import P1, run_engine, same_output

pytestmark = pytest.mark.e2e

STEPS = [
    {"name": "p1_cold", "prompts": [P1]},
    {"name": "p1_warm", "prompts": [P1]},
    {"name": "reset", "reset_prefix_cache": {"reset_connector": True}},
    {"name": "p1_after_reset", "prompts": [P1]},
    {"name": "p1_stored_again", "prompts": [P1]},
]


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    return run_engine(tiny_model, tmp_path_factory.mktemp("e2e-reset"), "reset", STEPS,
                      kvplug={"cpu_bytes": "256MiB", "codec": "raw"}, max_num_batched_tokens=128)


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
