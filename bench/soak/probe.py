"""Inside every engine process: where its memory is, asked for by the soak between batches.

Installed by ``site/sitecustomize.py`` when ``SOAK_PROBE_DIR`` is set (both engines, kvplug
and vLLM alone, so their figures compare). A daemon thread waits for ``probe.json``
(``{"seq": n, "trim": bool, "trace": "start" | "diff" | null}``) and answers each new seq in
``probe-<pid>.json`` with:

- ``before`` (and, with ``trim``, ``after`` a ``malloc_trim(0)``): RSS split as the kernel
  counts it (anon, file, shmem); glibc's ``mallinfo2`` summed over every arena: bytes
  malloc hands out (``in_use``: arena chunks in use plus mmapped chunks) and bytes it holds
  free (``free_held``: what fragmentation and per-thread arenas keep); and the anonymous
  resident memory by region (``[heap]``: the main arena; 64 MiB-aligned anonymous regions:
  the per-thread arenas' heaps; the rest: mmapped chunks such as big tensors).
- ``trace``: ``start`` begins ``tracemalloc``; ``diff`` names the Python allocation sites
  that grew most since it began (file:line, bytes, count).
- ``native``: ``start`` begins tracking every allocation, native ones included, with memray
  (optional: the dev extra) into ``memray-<pid>.bin``; ``stop`` ends it. What it allocated and
  never freed meanwhile (``native_leaks.py`` reads the file) is what grew, with its C and Python stacks.

So the soak can tell memory the allocator holds but nobody uses (falls at ``malloc_trim``,
``free_held`` grows) from memory something keeps (``in_use`` grows; tracemalloc names it
when it is Python's).
"""

from __future__ import annotations

import ctypes
import json
import os
import threading
import time

ENV = "SOAK_PROBE_DIR"
POLL_S = 0.05
ARENA_ALIGN = 64 << 20  # glibc's HEAP_MAX_SIZE on 64-bit: a thread arena's heap starts on this boundary


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


_libc = ctypes.CDLL(None)
_mallinfo2 = getattr(_libc, "mallinfo2", None)
if _mallinfo2 is not None:
    _mallinfo2.restype = _Mallinfo2
_trace_base = None
_native = None  # the memray Tracker while native tracking runs


def malloc_figures() -> dict:
    if _mallinfo2 is None:
        return {}
    m = _mallinfo2()
    return {"in_use": m.uordblks + m.hblkhd, "arena_in_use": m.uordblks, "mmapped": m.hblkhd,
            "free_held": m.fordblks, "arena_system": m.arena, "mmapped_chunks": m.hblks}


def status_figures() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            for key, name in (("VmRSS:", "rss"), ("RssAnon:", "rss_anon"), ("RssFile:", "rss_file"),
                              ("RssShmem:", "rss_shmem")):
                if line.startswith(key):
                    out[name] = int(line.split()[1]) * 1024
    return out


def anon_regions() -> dict:
    """Anonymous resident bytes by region: main heap, thread arenas, other mmaps."""
    out = {"heap": 0, "thread_arenas": 0, "thread_arena_count": 0, "other_anon": 0}
    kind = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=6)
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                start, end = (int(x, 16) for x in head[0].split("-"))
                name = head[5].strip() if len(head) > 5 else ""
                if name == "[heap]":
                    kind = "heap"
                elif name:
                    kind = None
                elif start % ARENA_ALIGN == 0 and end - start <= ARENA_ALIGN and "rw" in head[1]:
                    kind = "thread_arenas"
                    out["thread_arena_count"] += 1
                else:
                    kind = "other_anon"
            elif kind and line.startswith("Anonymous:"):
                out[kind] += int(line.split()[1]) * 1024
    return out


def figures() -> dict:
    return {**status_figures(), "malloc": malloc_figures(), "anon": anon_regions()}


def _trace(what: str) -> list | None:
    global _trace_base
    import tracemalloc

    if what == "start":
        tracemalloc.start(1)
        _trace_base = tracemalloc.take_snapshot()
        return None
    if _trace_base is None:
        return None
    now = tracemalloc.take_snapshot()
    top = now.compare_to(_trace_base, "lineno")[:15]
    return [{"where": str(s.traceback), "bytes": s.size_diff, "count": s.count_diff, "now": s.size} for s in top]


def _native_tracking(what: str, probe_dir: str) -> str | None:
    global _native
    import memray

    if what == "start" and _native is None:
        path = os.path.join(probe_dir, f"memray-{os.getpid()}.bin")
        _native = memray.Tracker(path, native_traces=True, follow_fork=False)
        _native.__enter__()
        return path
    if what == "stop" and _native is not None:
        _native.__exit__(None, None, None)
        _native = None
    return None


def answer(cmd: dict, probe_dir: str = "") -> dict:
    with open("/proc/self/comm") as f:
        name = f.read().strip()
    out = {"seq": cmd["seq"], "pid": os.getpid(), "name": name, "t": time.time(), "before": figures()}
    if cmd.get("trim"):
        t = time.perf_counter()
        _libc.malloc_trim(0)
        out["trim_s"] = round(time.perf_counter() - t, 4)
        out["after"] = figures()
    if cmd.get("trace"):
        out["trace"] = _trace(cmd["trace"])
    if cmd.get("native"):
        out["native"] = _native_tracking(cmd["native"], probe_dir)
    return out


def _loop(probe_dir: str) -> None:
    path, seen, stamp = os.path.join(probe_dir, "probe.json"), 0, None
    mine = os.path.join(probe_dir, f"probe-{os.getpid()}.json")
    while True:
        time.sleep(POLL_S)
        try:
            st = os.stat(path)
            if (st.st_mtime_ns, st.st_ino) == stamp:  # nothing new: a stat a poll, no read
                continue
            stamp = (st.st_mtime_ns, st.st_ino)
            with open(path) as f:
                cmd = json.load(f)
        except (OSError, ValueError):
            stamp = None
            continue
        if cmd.get("seq", 0) <= seen:
            continue
        seen = cmd["seq"]
        try:
            data = json.dumps(answer(cmd, probe_dir))
        except Exception as e:  # noqa: BLE001 - a probe must never take its engine down
            data = json.dumps({"seq": seen, "pid": os.getpid(), "error": repr(e)})
        with open(mine + ".tmp", "w") as f:
            f.write(data)
        os.replace(mine + ".tmp", mine)


def install(probe_dir: str) -> None:
    threading.Thread(target=_loop, args=(probe_dir,), name="soak-probe", daemon=True).start()
