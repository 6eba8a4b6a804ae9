"""A model mixing sliding-window and full-attention layers (Gemma / Mistral style).

kvplug is not SupportsHMA, so vLLM runs such a model with its hybrid manager
off: windowed layers get a full KV cache too, in one full-attention group
whose spec carries the window, and kvplug stores and loads every layer's
blocks. A block's KV is a function of its prefix whatever the window, so a
hit must give exactly what recomputing gives. The tiny model here has layers
0 and 2 windowed to 64 tokens and prompts of 300 tokens, well past the window.

One engine: what recomputing gives comes from the same engine, under a cache
salt no stored block has (a salt changes which blocks may hit, never the
output).
"""

from __future__ import annotations

import json
import shutil

import pytest

from vllm_e2e import P1, P2, run_engine, same_output

pytestmark = pytest.mark.e2e

WINDOW = 64
STEPS = [{"name": "p1_cold", "prompts": [P1]}, {"name": "p1_warm", "prompts": [P1]},
         {"name": "p2_mid_block", "prompts": [P2]},
         {"name": "p2_recomputed", "prompts": [P2], "cache_salt": "recompute"}]


@pytest.fixture(scope="module")
def windowed_model(tiny_model, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("windowed-model") / "model"
    shutil.copytree(tiny_model, path)
    config = json.loads((path / "config.json").read_text())
    config["layer_types"] = ["sliding_attention", "full_attention"] * (config["num_hidden_layers"] // 2)
    config["sliding_window"] = WINDOW
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def run(windowed_model, tmp_path_factory):
    return run_engine(windowed_model, tmp_path_factory.mktemp("e2e-window"), "kvplug", STEPS,
                      kvplug={"cpu_bytes": "256MiB", "codec": "raw"})


def test_the_model_really_has_windowed_layers(run):
    assert "Hybrid KV cache manager is disabled for this hybrid model" in run["log"]


def test_hits_on_a_windowed_model_give_what_recomputing_gives(run):
    (cold,) = run["steps"]["p1_cold"]["outputs"]
    (warm,) = run["steps"]["p1_warm"]["outputs"]
    assert cold["cached_tokens"] == 0 and warm["cached_tokens"] == len(P1) - 1
    same_output(warm, cold)
    (mid,) = run["steps"]["p2_mid_block"]["outputs"]
    (recomputed,) = run["steps"]["p2_recomputed"]["outputs"]
    assert mid["cached_tokens"] == 200 and recomputed["cached_tokens"] == 0
    same_output(mid, recomputed)
