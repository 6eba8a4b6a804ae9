"""Preemption: with a KV cache too small for the batch, vLLM preempts requests
and later resumes them by recomputing. kvplug keeps what they had computed, so
a resumed request loads its stored blocks back instead, and every output is the
very same as an engine that never ran short (no kvplug, one batch).
"""

from __future__ import annotations

import pytest

from vllm_e2e import run_engine, same_output, tokens

pytestmark = pytest.mark.e2e

PROMPTS = [tokens(40 + i, 240) for i in range(4)]  # 2 blocks each, 3 once 64 tokens are generated
STEP = [{"name": "batch", "prompts": PROMPTS, "max_tokens": 64}]


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e-preempt")
    reference = run_engine(tiny_model, work, "preempt-reference", STEP, max_model_len=512)
    short = run_engine(tiny_model, work, "preempt-kvplug", STEP, kvplug={"cpu_bytes": "64MiB", "codec": "raw"},
                       num_kv_blocks=7, max_model_len=512)  # room for 2 of the 4 requests at a time
    return reference["steps"]["batch"], short["steps"]["batch"]


def test_preempted_requests_resume_from_kvplug_with_the_same_output(runs):
    reference, short = runs
    assert short["counters"]["vllm_preemptions"] > 0  # the cache really ran short
    assert short["counters"]["hit_tokens"] > 0        # and resumed requests loaded what they had
    for got, want in zip(short["outputs"], reference["outputs"]):
        same_output(got, want)
