"""Driving vLLM's offline ``LLM`` from kvplug's tests, benches and demo."""

from __future__ import annotations

import time


def drain(llm, settle_s: float = 0.5) -> None:
    """Let the engine finish what it does after generate() returned (saving a finished
    request's partial tail, SSD write-backs) and take in those steps' outputs and stats."""
    time.sleep(settle_s)
    queue = getattr(llm.llm_engine.engine_core, "outputs_queue", None)
    while queue is not None and not queue.empty():
        llm.llm_engine.step()
