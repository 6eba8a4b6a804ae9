"""What the connector refuses at start-up: parallel layouts it cannot store yet."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kvplug.config import KVPlugConfig
from kvplug.connectors.vllm.geometry import geometry


def _config(**parallel):
    base = dict(tensor_parallel_size=1, pipeline_parallel_size=1, decode_context_parallel_size=1,
                prefill_context_parallel_size=1, nnodes=1)
    return SimpleNamespace(parallel_config=SimpleNamespace(**(base | parallel)))


@pytest.mark.parametrize("name", ["pipeline_parallel_size", "decode_context_parallel_size",
                                  "prefill_context_parallel_size"])
def test_pipeline_and_context_parallel_are_refused(name):
    with pytest.raises(ValueError, match=f"kvplug: {name}=2 is not supported yet; expected 1"):
        geometry(_config(**{name: 2}), None, KVPlugConfig())


def test_an_engine_over_several_nodes_is_refused():
    with pytest.raises(ValueError, match="over 2 nodes is not supported"):
        geometry(_config(tensor_parallel_size=4, nnodes=2), None, KVPlugConfig())
