"""Two engines as two hosts would run them share one Valkey deployment (auth on).

Engine A (its own process, CPU tier and SSD directory) serves Q1 cold and
writes its full blocks through to the server. Engine B (another process, an
empty CPU tier, another SSD directory) serves Q1 next: every full block comes
from the remote tier (fetched in the background, promoted into its CPU tier,
verified). Two deployments, one engine pair each (an engine start is most of
this module's time):

- a 3-node cluster, codec raw: B's greedy tokens and top-5 logprobs are
  identical to vLLM without kvplug;
- a single server, codec int4h (blocks travel encoded): B's output is within
  the tolerance of the int4h e2e test (test_e2e_codecs.py).

A prompt that B shares with nobody misses.
"""

from __future__ import annotations

import os

import pytest

from kvplug.tools.valkey_server import PASSWORD, USER, Server, cluster_url, start_cluster, stop_all
from test_e2e_codecs import MAX_FIRST_TOKEN_DIFF
from vllm_e2e import BLOCK, Q1, Q2, run_engine, same_output

pytestmark = pytest.mark.e2e

DEPLOYMENTS = {"cluster-raw": ("cluster", "raw"), "single-int4h": ("single", "int4h")}


@pytest.fixture(scope="module", params=list(DEPLOYMENTS))
def runs(request, tiny_model, tmp_path_factory):
    topology, codec = DEPLOYMENTS[request.param]
    work = tmp_path_factory.mktemp(f"e2e-remote-{request.param}")
    if topology == "cluster":
        servers = start_cluster(str(work / "cluster"))
        url = cluster_url(servers)
    else:
        servers = [Server(str(work / "server")).start()]
        url = servers[0].url
    os.environ["E2E_REMOTE_PW"] = PASSWORD  # the engines' processes inherit it
    try:
        def kvplug(host: str) -> dict:
            return {"cpu_bytes": "64MiB", "ssd_path": str(work / host / "ssd"), "ssd_bytes": "256MiB",
                    "codec": codec, "remote_url": url, "remote_username": USER,
                    "remote_password": "env:E2E_REMOTE_PW", "remote_namespace": "e2e"}
        first = run_engine(tiny_model, work, "remote-a", [{"name": "q1", "prompts": [Q1]}],
                           kvplug=kvplug("host-a"), linger_s=1)
        keys = sum(s.client().dbsize() for s in servers)
        second = run_engine(tiny_model, work, "remote-b", [
            {"name": "q1", "prompts": [Q1]}, {"name": "q2", "prompts": [Q2]},
        ], kvplug=kvplug("host-b"))
        yield codec, first, second, keys
    finally:
        os.environ.pop("E2E_REMOTE_PW", None)
        stop_all(servers)


def close_enough(codec: str, out: dict, ref: dict) -> None:
    """raw: identical; int4h: the first token and its top-5 logprobs within the codec test's tolerance."""
    if codec == "raw":
        same_output(out, ref)
        return
    assert out["token_ids"][0] == ref["token_ids"][0]
    first = [abs(out["logprobs"][0][t] - ref["logprobs"][0][t]) for t in set(out["logprobs"][0]) & set(ref["logprobs"][0])]
    print(f"{codec} remote hit: first-token top-5 max |dlogprob| {max(first):.4f}")
    assert first and max(first) <= MAX_FIRST_TOKEN_DIFF


def test_engine_a_computes_and_writes_its_full_blocks_to_the_server(runs, reference):
    _, first, _, keys = runs
    (out,) = first["steps"]["q1"]["outputs"]
    assert out["cached_tokens"] == 0
    same_output(out, reference["Q1"][0])  # computed, nothing loaded: exact for every codec
    assert keys == len(Q1) // BLOCK  # full blocks only (on a cluster spread over the nodes)


def test_engine_b_hits_from_the_remote_tier(runs, reference):
    codec, first, second, _ = runs
    step = second["steps"]["q1"]
    (out,) = step["outputs"]
    full = (len(Q1) // BLOCK) * BLOCK
    assert out["cached_tokens"] == full
    assert step["counters"]["remote_fetched_blocks"] == len(Q1) // BLOCK
    assert step["counters"]["hit_tokens"] == full
    close_enough(codec, out, reference["Q1"][0])


def test_a_prompt_nobody_stored_misses_on_the_remote_too(runs, reference):
    _, _, second, _ = runs
    step = second["steps"]["q2"]
    (out,) = step["outputs"]
    assert out["cached_tokens"] == 0 and step["counters"].get("remote_fetched_blocks", 0) == 0
    same_output(out, reference["Q2"][0])
