"""Inside vLLM's EngineCore: a timeline of each step and each SSD promotion (``trace-<pid>.jsonl``).

Installed beside inject.py by ``site/sitecustomize.py`` when ``SOAK_TRACE`` is
set (in vLLM alone too: its steps are what a kvplug engine's are compared
with). Wraps, as their modules get imported, without changing them:

- ``Scheduler.schedule`` / ``update_from_output``: one ``step`` line per engine
  step: when it was scheduled and when its output came back, the tokens given
  to each request and what each request had computed before (its hit);
- ``SSDPromotions.started`` / ``waiting``: ``promo`` lines: when a request's
  promotion started (blocks read, the deadline the policy set), each check of
  it (waited, landed or not) and when it was given up;
- ``FileIO.preadv``: ``read`` lines: each SSD read syscall's start and end and
  its thread (is a late read still holding an I/O thread?).

Times are ``time.monotonic()`` (CLOCK_MONOTONIC: one clock for every process,
so they line up with vLLM's ``RequestOutput.metrics`` timestamps).
"""

from __future__ import annotations

import json
import os
import threading
import time

_lock = threading.Lock()
_file = None


def emit(kind: str, **fields) -> None:
    line = json.dumps({"k": kind, "t": time.monotonic(), **fields})
    with _lock:
        if _file is not None:
            _file.write(line + "\n")
            _file.flush()


def _patch_scheduler(module) -> None:
    cls = module.Scheduler
    if getattr(cls, "__trace_patched__", False):
        return
    schedule, update = cls.schedule, cls.update_from_output

    def traced_schedule(self, *args, **kwargs):
        t0 = time.monotonic()
        before = {r.request_id: r.num_computed_tokens for r in list(self.waiting) + list(self.running)}
        out = schedule(self, *args, **kwargs)
        sched = dict(out.num_scheduled_tokens)
        emit("step", t0=t0, sched=sched, computed={r: before.get(r) for r in sched},
             waiting=len(self.waiting))
        return out

    def traced_update(self, scheduler_output, *args, **kwargs):
        out = update(self, scheduler_output, *args, **kwargs)
        if scheduler_output.total_num_scheduled_tokens:
            emit("step_end", n=scheduler_output.total_num_scheduled_tokens)
        return out

    cls.schedule, cls.update_from_output = traced_schedule, traced_update
    cls.__trace_patched__ = True


def _patch_promotions(module) -> None:
    cls = module.SSDPromotions
    if getattr(cls, "__trace_patched__", False):
        return
    started, waiting = cls.started, cls.waiting

    def traced_started(self, st):
        started(self, st)
        if st.promoting:
            nbytes = st.promoting * self.block_bytes
            emit("promo", ev="start", req=st.req_id, blocks=st.promoting, asked=st.asked,
                 deadline=self.policy.promotion_deadline(st.handle.num_tokens_asked, {"ssd": nbytes},
                                                         self.config.promotion_timeout_s,
                                                         self.config.promotion_min_wait_s),
                 recompute=self.policy.recompute_seconds(st.handle.num_tokens_asked),
                 predicted=self.policy.load_seconds({"ssd": nbytes}))

    def traced_waiting(self, st):
        promoting = st.promoting
        wait = waiting(self, st)
        if promoting:
            emit("promo", ev="gave_up" if st.gave_up else ("wait" if wait else "landed"), req=st.req_id,
                 waited=time.monotonic() - st.asked, done_at=st.handle.done_at or None)
        return wait

    cls.started, cls.waiting = traced_started, traced_waiting
    cls.__trace_patched__ = True


def _patch_fileio(module) -> None:
    cls = module.FileIO
    if getattr(cls, "__trace_patched__", False):
        return
    preadv = cls.preadv

    def traced_preadv(self, fd, bufs, offset):
        t0 = time.monotonic()
        try:
            return preadv(self, fd, bufs, offset)
        finally:
            emit("read", t0=t0, thread=threading.current_thread().name,
                 nbytes=sum(len(memoryview(b).cast("B")) for b in bufs))

    cls.preadv = traced_preadv
    cls.__trace_patched__ = True


PATCHES = {
    "vllm.v1.core.sched.scheduler": _patch_scheduler,
    "kvplug.connectors.vllm.ssd_promotions": _patch_promotions,
    "kvplug.tiers.aligned_io": _patch_fileio,
}


def start(trace_dir: str) -> None:
    """Open this process's trace file (the wraps, ``PATCHES``, go in through inject.install:
    one import hook, each trace wrap around inject.py's own)."""
    global _file
    _file = open(os.path.join(trace_dir, f"trace-{os.getpid()}.jsonl"), "a")


def load(trace_dir) -> list[dict]:
    """Every line of every process's trace in ``trace_dir``, oldest first."""
    from pathlib import Path

    rows = []
    for f in Path(trace_dir).glob("trace-*.jsonl"):
        for line in f.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass  # a line cut by a kill
    return sorted(rows, key=lambda r: r["t"])
