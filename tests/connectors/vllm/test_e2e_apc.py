"""kvplug beside vLLM's own prefix cache (on by default in production).

vLLM serves the full blocks it still holds; kvplug is asked only beyond them
(vLLM passes a block-aligned count) and supplies the rest, down to the token.
Outputs must equal the reference engine's (no kvplug, no prefix cache).
"""

from __future__ import annotations

import pytest

from vllm_e2e import BLOCK, P1, P2, run_engine, same_output

pytestmark = pytest.mark.e2e

STEPS = [
    {"name": "p1_cold", "prompts": [P1]},
    {"name": "p1_warm", "prompts": [P1]},
    {"name": "p2_mid_block", "prompts": [P2]},
]


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    return run_engine(tiny_model, tmp_path_factory.mktemp("e2e-apc"), "apc", STEPS,
                      kvplug={"cpu_bytes": "256MiB", "codec": "raw"}, prefix_caching=True)


def test_cold_run_matches_reference(run, reference):
    (out,) = run["steps"]["p1_cold"]["outputs"]
    assert out["cached_tokens"] == 0
    same_output(out, reference["P1"][0])


def test_vllm_serves_full_blocks_and_kvplug_the_tail(run, reference):
    step = run["steps"]["p1_warm"]
    (out,) = step["outputs"]
    full = (len(P1) - 1) // BLOCK * BLOCK  # what vLLM's prefix cache holds
    assert out["cached_tokens"] == len(P1) - 1
    assert step["counters"].get("hit_tokens_cpu", 0) == len(P1) - 1 - full
    same_output(out, reference["P1"][0])


def test_mid_block_hit_beyond_vllms_blocks(run, reference):
    step = run["steps"]["p2_mid_block"]
    (out,) = step["outputs"]
    assert out["cached_tokens"] == 200  # 1 block from vLLM + 72 tokens from kvplug
    assert step["counters"].get("hit_tokens_cpu", 0) == 200 - BLOCK
    same_output(out, reference["P2"][0])
