"""Two engines as two hosts would run them share one 3-node Valkey cluster (auth on).

Engine A (its own process, CPU tier and SSD directory) serves Q1 cold and
writes its full blocks through to the cluster. Engine B (another process, an
empty CPU tier, another SSD directory) serves Q1 next: every full block comes
from the remote tier (fetched in the background, promoted into its CPU tier,
verified) with greedy tokens and top-5 logprobs identical to vLLM without
kvplug (codec raw). A third prompt that B shares with nobody misses.
"""

from __future__ import annotations

import os

import pytest

from kvplug.tools.valkey_server import PASSWORD, USER, cluster_url, start_cluster, stop_all
from vllm_e2e import BLOCK, Q1, Q2, run_engine, same_output

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e-remote")
    servers = start_cluster(str(work / "cluster"))
    os.environ["E2E_REMOTE_PW"] = PASSWORD  # the engines' processes inherit it
    try:
        def kvplug(host: str) -> dict:
            return {"cpu_bytes": "64MiB", "ssd_path": str(work / host / "ssd"), "ssd_bytes": "256MiB",
                    "codec": "raw", "remote_url": cluster_url(servers), "remote_username": USER,
                    "remote_password": "env:E2E_REMOTE_PW", "remote_namespace": "e2e"}
        first = run_engine(tiny_model, work, "remote-a", [{"name": "q1", "prompts": [Q1]}],
                           kvplug=kvplug("host-a"), linger_s=1)
        keys = sum(s.client().dbsize() for s in servers)
        second = run_engine(tiny_model, work, "remote-b", [
            {"name": "q1", "prompts": [Q1]}, {"name": "q2", "prompts": [Q2]},
        ], kvplug=kvplug("host-b"))
        yield first, second, keys
    finally:
        os.environ.pop("E2E_REMOTE_PW", None)
        stop_all(servers)


def test_engine_a_computes_and_writes_its_full_blocks_to_the_cluster(runs, reference):
    first, _, keys = runs
    (out,) = first["steps"]["q1"]["outputs"]
    assert out["cached_tokens"] == 0
    same_output(out, reference["Q1"][0])
    assert keys == len(Q1) // BLOCK  # full blocks only, spread over the nodes


def test_engine_b_hits_from_the_remote_tier_with_identical_output(runs, reference):
    _, second, _ = runs
    step = second["steps"]["q1"]
    (out,) = step["outputs"]
    full = (len(Q1) // BLOCK) * BLOCK
    assert out["cached_tokens"] == full
    assert step["counters"]["remote_fetched_blocks"] == len(Q1) // BLOCK
    assert step["counters"]["hit_tokens"] == full
    same_output(out, reference["Q1"][0])


def test_a_prompt_nobody_stored_misses_on_the_remote_too(runs, reference):
    _, second, _ = runs
    step = second["steps"]["q2"]
    (out,) = step["outputs"]
    assert out["cached_tokens"] == 0 and step["counters"].get("remote_fetched_blocks", 0) == 0
    same_output(out, reference["Q2"][0])
