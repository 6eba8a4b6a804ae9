"""Which cores the worker gives its CPU transfer thread."""

from __future__ import annotations

import os

from kvplug.connectors.vllm.worker import transfer_cpus


def _affinity(monkeypatch, engine: set[int], worker: set[int]) -> None:
    parent = os.getppid()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: engine if pid == parent else worker)


def test_auto_takes_the_cores_vllm_keeps_free_of_compute_threads(monkeypatch):
    _affinity(monkeypatch, engine={0, 1, 2, 3}, worker={0, 1, 2})
    assert transfer_cpus("auto", tp_size=1) == {3}


def test_auto_stays_on_the_compute_cores_when_none_are_free_or_ranks_share_the_machine(monkeypatch):
    _affinity(monkeypatch, engine={0, 1}, worker={0, 1})
    assert transfer_cpus("auto", tp_size=1) is None
    _affinity(monkeypatch, engine={0, 1, 2}, worker={0})
    assert transfer_cpus("auto", tp_size=2) is None  # {1, 2} may be the other rank's compute cores


def test_shared_and_explicit_lists():
    assert transfer_cpus("shared", tp_size=1) is None
    assert transfer_cpus("2,5-6", tp_size=4) == {2, 5, 6}
