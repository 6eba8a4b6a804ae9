"""What the connector refuses at start-up: parallel layouts it cannot store yet."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import torch
from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

from kvplug.config import KVPlugConfig
from kvplug.connectors.vllm.geometry import geometry


def _config(speculative=None, sleep=False, cache_dtype="auto", **parallel):
    base = dict(tensor_parallel_size=1, pipeline_parallel_size=1, decode_context_parallel_size=1,
                prefill_context_parallel_size=1, nnodes=1)
    return SimpleNamespace(parallel_config=SimpleNamespace(**(base | parallel)),
                           speculative_config=None if speculative is None else SimpleNamespace(method=speculative),
                           model_config=SimpleNamespace(enable_sleep_mode=sleep, is_diffusion=lambda: False),
                           cache_config=SimpleNamespace(cache_dtype=cache_dtype))


def _kv_cache_config(*specs):
    return SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=s, layer_names=["l0"]) for s in specs])


FULL = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)


@pytest.mark.parametrize("name", ["pipeline_parallel_size", "decode_context_parallel_size",
                                  "prefill_context_parallel_size"])
def test_pipeline_and_context_parallel_are_refused(name):
    with pytest.raises(ValueError, match=f"kvplug: {name}=2 is not supported yet; expected 1"):
        geometry(_config(**{name: 2}), None, KVPlugConfig())


def test_an_engine_over_several_nodes_is_refused():
    with pytest.raises(ValueError, match="over 2 nodes is not supported"):
        geometry(_config(tensor_parallel_size=4, nnodes=2), None, KVPlugConfig())


@pytest.mark.parametrize("method", ["eagle", "eagle3", "mtp", "draft_model"])
def test_speculative_methods_with_a_draft_kv_cache_are_refused(method):
    with pytest.raises(ValueError, match=f"method={method!r} is not supported yet"):
        geometry(_config(speculative=method), _kv_cache_config(FULL), KVPlugConfig())


def test_sleep_mode_is_refused():
    with pytest.raises(ValueError, match="enable_sleep_mode=True is not supported yet"):
        geometry(_config(sleep=True), _kv_cache_config(FULL), KVPlugConfig())


def test_sliding_window_and_hybrid_models_are_refused():
    window = SlidingWindowSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.bfloat16, sliding_window=64)
    for groups in ((window,), (FULL, window)):
        with pytest.raises(ValueError, match="only models whose layers all use full attention"):
            geometry(_config(), _kv_cache_config(*groups), KVPlugConfig())


def test_a_quantized_kv_cache_is_refused_naming_the_setting():
    fp8 = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8' .* is not supported"):
        geometry(_config(cache_dtype="fp8"), _kv_cache_config(fp8), KVPlugConfig())


def test_non_causal_models_are_refused():
    spec = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.bfloat16, non_causal=True)
    with pytest.raises(ValueError, match="models with non_causal attention"):
        geometry(_config(), _kv_cache_config(spec), KVPlugConfig())


def test_diffusion_models_are_refused():
    config = _config()
    config.model_config.is_diffusion = lambda: True
    with pytest.raises(ValueError, match="diffusion language models are not supported"):
        geometry(config, _kv_cache_config(FULL), KVPlugConfig())
