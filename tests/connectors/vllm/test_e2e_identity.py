"""What a request's KV depends on besides its tokens: its LoRA adapter and its cache salt.

vLLM's prefix cache keeps the KV of different adapters and of different cache
salts apart (both go into its block hashes); kvplug must too. The same prompt
under another adapter has other K and V, so loading the base model's blocks
for it would give wrong output; a cache salt isolates tenants, so a salted
request must never hit blocks stored by an unsalted or differently salted one.

One kvplug engine (LoRA enabled, CPU tier, raw codec, vLLM's prefix cache
off) runs every step below in order; one engine without kvplug, LoRA enabled
too, gives the reference outputs. Both adapters are built locally with random
weights (kvplug.tools.tiny_lora).
"""

from __future__ import annotations

import pytest

from vllm_e2e import run_engine, same_output, tokens

pytestmark = pytest.mark.e2e

L = tokens(20, 300)  # the LoRA scenario's prompt: 2 full blocks + 44
S = tokens(21, 300)  # the cache-salt scenario's prompt
SALT_A, SALT_B = "tenant-a", "tenant-b"


def _steps(lora_a: dict, lora_b: dict) -> list[dict]:
    return [
        # LoRA: the base model stores L; adapter A must not load it, stores its own,
        # then hits it; the base model still hits its own; adapter B hits neither.
        {"name": "base_cold", "prompts": [L]},
        {"name": "lora_a_cold", "prompts": [L], "lora": lora_a},
        {"name": "lora_a_warm", "prompts": [L], "lora": lora_a},
        {"name": "base_warm", "prompts": [L]},
        {"name": "lora_b_cold", "prompts": [L], "lora": lora_b},
        {"name": "lora_b_warm", "prompts": [L], "lora": lora_b},
        # cache_salt: unsalted S stored; salted S misses, is stored, hits; another
        # salt misses; unsalted S still hits.
        {"name": "s_plain_cold", "prompts": [S]},
        {"name": "s_salt_a_cold", "prompts": [S], "cache_salt": SALT_A},
        {"name": "s_salt_a_warm", "prompts": [S], "cache_salt": SALT_A},
        {"name": "s_salt_b_cold", "prompts": [S], "cache_salt": SALT_B},
        {"name": "s_plain_warm", "prompts": [S]},
    ]


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    from kvplug.tools import tiny_lora

    work = tmp_path_factory.mktemp("e2e-identity")
    lora_a = {"name": "adapter-a", "id": 1, "path": tiny_lora.build(tiny_model, work / "lora-a", rank=8, seed=1)}
    lora_b = {"name": "adapter-b", "id": 2, "path": tiny_lora.build(tiny_model, work / "lora-b", rank=8, seed=2)}
    lora = dict(enable_lora=True, max_lora_rank=8)
    reference = run_engine(tiny_model, work, "identity-reference", [
        {"name": "base", "prompts": [L]},
        {"name": "lora_a", "prompts": [L], "lora": lora_a},
        {"name": "lora_b", "prompts": [L], "lora": lora_b},
        {"name": "s", "prompts": [S]},
    ], **lora)
    run = run_engine(tiny_model, work, "identity-kvplug", _steps(lora_a, lora_b),
                     kvplug={"cpu_bytes": "256MiB", "codec": "raw"}, **lora)
    ref = {name: step["outputs"][0] for name, step in reference["steps"].items()}
    return run, ref


def _out(run: dict, step: str) -> dict:
    (out,) = run["steps"][step]["outputs"]
    return out


def test_adapters_change_the_output(runs):
    # Otherwise the scenario could not tell the base model's KV from an adapter's.
    _, ref = runs
    assert ref["lora_a"]["token_ids"] != ref["base"]["token_ids"]
    assert ref["lora_b"]["token_ids"] != ref["base"]["token_ids"]
    assert ref["lora_b"]["token_ids"] != ref["lora_a"]["token_ids"]


def test_base_prompt_cold_matches_reference(runs):
    run, ref = runs
    out = _out(run, "base_cold")
    assert out["cached_tokens"] == 0
    same_output(out, ref["base"])


def test_lora_request_does_not_load_base_model_kv(runs):
    run, ref = runs
    out = _out(run, "lora_a_cold")
    assert out["cached_tokens"] == 0
    same_output(out, ref["lora_a"])


def test_lora_request_hits_its_own_blocks(runs):
    run, ref = runs
    out = _out(run, "lora_a_warm")
    assert out["cached_tokens"] == len(L) - 1
    same_output(out, ref["lora_a"])


def test_base_prompt_still_hits_after_lora_requests(runs):
    run, ref = runs
    out = _out(run, "base_warm")
    assert out["cached_tokens"] == len(L) - 1
    same_output(out, ref["base"])


def test_second_adapter_does_not_hit_first_adapters_blocks(runs):
    run, ref = runs
    cold = _out(run, "lora_b_cold")
    assert cold["cached_tokens"] == 0
    same_output(cold, ref["lora_b"])
    warm = _out(run, "lora_b_warm")
    assert warm["cached_tokens"] == len(L) - 1
    same_output(warm, ref["lora_b"])


def test_unsalted_prompt_cold_matches_reference(runs):
    run, ref = runs
    out = _out(run, "s_plain_cold")
    assert out["cached_tokens"] == 0
    same_output(out, ref["s"])


def test_salted_prompt_does_not_hit_unsalted_blocks(runs):
    run, ref = runs
    out = _out(run, "s_salt_a_cold")
    assert out["cached_tokens"] == 0
    same_output(out, ref["s"])  # a salt changes what may be shared, never the output


def test_salted_prompt_hits_blocks_of_its_own_salt(runs):
    run, ref = runs
    out = _out(run, "s_salt_a_warm")
    assert out["cached_tokens"] == len(S) - 1
    same_output(out, ref["s"])


def test_other_salt_does_not_hit(runs):
    run, ref = runs
    out = _out(run, "s_salt_b_cold")
    assert out["cached_tokens"] == 0
    same_output(out, ref["s"])


def test_unsalted_prompt_still_hits_after_salted_requests(runs):
    run, ref = runs
    out = _out(run, "s_plain_warm")
    assert out["cached_tokens"] == len(S) - 1
    same_output(out, ref["s"])
