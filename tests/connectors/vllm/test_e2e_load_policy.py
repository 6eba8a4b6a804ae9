"""kvplug spelled as vLLM's JSON kv_transfer_config, without kv_load_failure_policy.

``vllm serve --kv-transfer-config '{"kv_connector": "kvplug", "kv_role":
"kv_both", "kv_connector_extra_config": {...}}'`` leaves vLLM's
kv_load_failure_policy at its default, "fail": a request one of whose blocks
cannot be loaded would end with an error. kvplug's blocks are a cache, so a
failed load must be recomputed whatever the spelling: the request completes
with the very same output.

One kvplug engine (CPU tier, raw codec, no kv_load_failure_policy): P3 cold,
P3 with the worker unable to read the second block of the load, P3 again.
Outputs are compared with the session's reference engine.
"""

from __future__ import annotations

import pytest

from vllm_e2e import P3, run_engine, same_output

pytestmark = pytest.mark.e2e

STEPS = [
    {"name": "p3_cold", "prompts": [P3]},
    {"name": "p3_load_error", "prompts": [P3], "fail_second_block": True},
    {"name": "p3_after_error", "prompts": [P3]},
]


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    return run_engine(tiny_model, tmp_path_factory.mktemp("e2e-load-policy"), "load-policy", STEPS,
                      kvplug={"cpu_bytes": "256MiB", "codec": "raw"}, load_failure_policy=None)


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
