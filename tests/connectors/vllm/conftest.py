from __future__ import annotations

import pytest

from vllm_e2e import REFERENCE_STEPS, run_engine


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from kvplug.tools.tiny_model import build

    return build(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def reference(tiny_model, tmp_path_factory) -> dict:
    """Every batch the e2e tests use, through one engine without kvplug: name -> outputs."""
    steps = [{"name": name, "prompts": prompts} for name, prompts in REFERENCE_STEPS.items()]
    result = run_engine(tiny_model, tmp_path_factory.mktemp("reference"), "reference", steps)
    return {name: step["outputs"] for name, step in result["steps"].items()}
