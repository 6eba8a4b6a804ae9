"""The lossy codecs in a real engine (int4h; int4kcs: keys per channel, each block's first token's
keys exact; it supersedes int4kc, whose kernels it shares): a prompt restored
from 4-bit KV stays close to the exact run. Tolerance: the first token's top-5 logprobs
within MAX_FIRST_TOKEN_DIFF of the reference (the largest difference is printed)."""

from __future__ import annotations

import pytest

from vllm_e2e import P1, max_logprob_diff, run_engine

pytestmark = pytest.mark.e2e

MAX_FIRST_TOKEN_DIFF = 0.25


@pytest.fixture(scope="module", params=["int4h", "int4kcs"])
def run(request, tiny_model, tmp_path_factory):
    codec = request.param
    return codec, run_engine(tiny_model, tmp_path_factory.mktemp(f"e2e-{codec}"), codec,
                             [{"name": "cold", "prompts": [P1]}, {"name": "warm", "prompts": [P1]}],
                             kvplug={"cpu_bytes": "64MiB", "codec": codec})


def test_restored_prompt_is_close_to_exact(run, reference):
    codec, run = run
    (cold,) = run["steps"]["cold"]["outputs"]
    (warm,) = run["steps"]["warm"]["outputs"]
    ref = reference["P1"][0]
    assert cold["token_ids"] == ref["token_ids"]  # nothing loaded yet: exact
    assert warm["cached_tokens"] == len(P1) - 1
    first = {t: abs(warm["logprobs"][0][t] - ref["logprobs"][0][t]) for t in set(warm["logprobs"][0]) & set(ref["logprobs"][0])}
    worst = max_logprob_diff(warm, ref)
    agree = next((i for i, (a, b) in enumerate(zip(warm["token_ids"], ref["token_ids"])) if a != b), len(ref["token_ids"]))
    print(f"{codec}: first-token top-5 max |dlogprob| {max(first.values()):.4f}; over the first {agree} "
          f"agreeing tokens {worst:.4f}; bytes per block {run['steps']['warm']['counters']['load_bytes'] // 3}")
    assert warm["token_ids"][0] == ref["token_ids"][0]
    assert max(first.values()) <= MAX_FIRST_TOKEN_DIFF
