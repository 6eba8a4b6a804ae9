"""Which cores the worker gives its CPU transfer thread."""

from __future__ import annotations

import os

import pytest

from kvplug.config import ConfigError
from kvplug.connectors.vllm.worker import transfer_cpus


def _affinity(monkeypatch, engine: set[int], threads: list[set[int]]) -> None:
    """The engine process's cores, and this worker's threads' masks (thread 0 calls)."""
    parent = os.getppid()
    masks = {parent: engine, 0: threads[0]} | {1000 + i: m for i, m in enumerate(threads)}
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: masks[pid])
    monkeypatch.setattr(os, "listdir", lambda path: [str(1000 + i) for i in range(len(threads))])


def test_auto_takes_the_cores_no_compute_thread_is_bound_to(monkeypatch):
    # vLLM binds one OpenMP thread per compute core; a helper thread may run anywhere.
    _affinity(monkeypatch, engine={0, 1, 2, 3}, threads=[{0}, {1}, {2}, {0, 1, 2, 3}])
    assert transfer_cpus("auto", tp_size=1) == {3}


def test_auto_stays_on_the_compute_cores_when_none_are_free_or_ranks_share_the_machine(monkeypatch):
    _affinity(monkeypatch, engine={0, 1}, threads=[{0}, {1}])
    assert transfer_cpus("auto", tp_size=1) is None
    _affinity(monkeypatch, engine={0, 1}, threads=[{0, 1}])  # nothing bound (VLLM_CPU_OMP_THREADS_BIND=nobind)
    assert transfer_cpus("auto", tp_size=1) is None
    _affinity(monkeypatch, engine={0, 1, 2}, threads=[{0}])
    assert transfer_cpus("auto", tp_size=2) is None  # {1, 2} may be the other rank's compute cores


def test_shared_and_explicit_lists(monkeypatch):
    assert transfer_cpus("shared", tp_size=1) is None
    _affinity(monkeypatch, engine={0, 1, 2, 3, 4, 5, 6}, threads=[{0}])
    assert transfer_cpus("2,5-6", tp_size=4) == {2, 5, 6}
    assert transfer_cpus("5-9", tp_size=1) == {5, 6}  # kept to the cores the engine may use
    with pytest.raises(ConfigError, match=r"transfer_cpus='8-9' names no CPU this engine may run on"):
        transfer_cpus("8-9", tp_size=1)
