"""The series: one sample of an engine (its processes' RSS, fds and threads; kvplug's counters;
the store's own figures from inside EngineCore) and the growth of a field over samples."""

from __future__ import annotations

import time

from .engines import Engine


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys over xs (None with fewer than 3 points)."""
    if len(xs) < 3:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return None if sxx == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def growth(series: list[dict], field: str, from_request: int) -> dict:
    """Growth of one series after warm-up: per 1,000 requests, absolute and in % of its mean."""
    pts = [(s["request"], s[field]) for s in series if s["request"] >= from_request and s.get(field) is not None]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    k = slope(xs, ys)
    if k is None:
        return {"points": len(pts), "per_1000_requests": None, "pct_per_1000_requests": None}
    mean = sum(ys) / len(ys)
    return {"points": len(pts), "from_request": from_request, "mean": round(mean, 1),
            "first": ys[0], "last": ys[-1], "min": min(ys), "max": max(ys),
            "per_1000_requests": round(k * 1000, 1),
            "pct_per_1000_requests": round(100 * k * 1000 / mean, 3) if mean else None}


TAGS = {"runner": "runner", "EngineCore": "engine_core", "VLLM::Worker": "worker"}


def sample(engine: Engine, request: int, t0: float, hits: int, failed_n: int, trim: bool = False,
           trace: str | None = None, native: str | None = None) -> dict:
    """One point of the series: processes, kvplug counters, the store's own figures; with a
    memory probe (probe.py), the allocator's figures of EngineCore and the worker, and their RSS
    after ``malloc_trim(0)`` (``trim``)."""
    now = time.time()
    procs = engine.processes()
    counters = engine.counters()
    snap = engine.snapshot(newer_than=now - 0.05) or {}
    store = snap.get("store", {})
    cpu, ssd, st = store.get("cpu", {}), store.get("ssd", {}), store.get("store", {})
    out = {"request": request, "t_s": round(time.monotonic() - t0, 2), "hit_requests": hits, "failed": failed_n,
           "rss_total": sum(p["rss"] for p in procs), "fds_total": sum(p["fds"] for p in procs),
           "threads_total": sum(p["threads"] for p in procs)}
    for p in procs:
        if p["name"] in TAGS:
            tag = TAGS[p["name"]]
            out[f"rss_{tag}"], out[f"fds_{tag}"], out[f"threads_{tag}"] = p["rss"], p["fds"], p["threads"]
            for part in ("anon", "file", "shmem"):
                out[f"rss_{part}_{tag}"] = p.get(f"rss_{part}")
    probed = [p for p in procs if p["name"] in ("EngineCore", "VLLM::Worker")]
    answers = engine.probe([p["pid"] for p in probed], trim=trim, trace=trace, native=native)
    for p in probed:
        a = answers.get(p["pid"])
        if a is not None and "before" in a:
            out.update(memory_fields(TAGS[p["name"]], a))
    out.update({
        "hit_tokens": counters.get("hit_tokens", 0), "hit_tokens_cpu": counters.get("hit_tokens_cpu", 0),
        "hit_tokens_ssd": counters.get("hit_tokens_ssd", 0),
        "promotion_timeouts": counters.get("promotion_timeouts", 0),
        "promotion_failed_blocks": counters.get("promotion_failed_blocks", 0),
        "load_failed_blocks": counters.get("load_failed_blocks", 0),
        "slab_used_slots": cpu.get("used_slots"), "slab_slots": cpu.get("capacity_blocks"),
        "cpu_blocks": cpu.get("blocks"), "pinned_blocks": cpu.get("pinned_blocks"),
        "ssd_blocks": ssd.get("blocks"), "ssd_read_pins": snap.get("ssd_read_pins"),
        "writes_in_flight": st.get("writes_in_flight"),
        "index_blocks": snap.get("index_blocks"), "index_bytes": snap.get("index_bytes"),
        "scheduler_requests": snap.get("scheduler_reqs"), "scheduler_jobs": snap.get("scheduler_jobs"),
        "ssd_corruptions": ssd.get("corruptions"), "ssd_io_faults": ssd.get("io_faults"),
        "ssd_evictions": ssd.get("evictions"), "cpu_evictions": st.get("evictions"),
        "injected": snap.get("injected", {}),
    })
    return out


def memory_fields(tag: str, a: dict) -> dict:
    """A probe's answer as series fields: where the process's anonymous memory is."""
    b = a["before"]
    m, anon = b.get("malloc", {}), b.get("anon", {})
    out = {f"malloc_in_use_{tag}": m.get("in_use"), f"malloc_free_held_{tag}": m.get("free_held"),
           f"malloc_mmapped_{tag}": m.get("mmapped"), f"anon_heap_{tag}": anon.get("heap"),
           f"anon_thread_arenas_{tag}": anon.get("thread_arenas"), f"anon_other_{tag}": anon.get("other_anon"),
           f"thread_arena_count_{tag}": anon.get("thread_arena_count")}
    if "after" in a:
        out[f"rss_after_trim_{tag}"] = a["after"]["rss"]
        out[f"rss_anon_after_trim_{tag}"] = a["after"]["rss_anon"]
    if a.get("trace") is not None:
        out[f"trace_{tag}"] = a["trace"]
    return out


MEMORY_FIELDS = tuple(f"{f}_{proc}" for proc in ("engine_core", "worker") for f in (
    "malloc_in_use", "malloc_free_held", "malloc_mmapped", "anon_heap", "anon_thread_arenas", "anon_other",
    "rss_after_trim", "rss_anon_after_trim"))
SLOPE_FIELDS = ("rss_total", "rss_runner", "rss_engine_core", "rss_worker", "fds_total", "fds_runner",
                "fds_engine_core", "fds_worker", "threads_total")
RSS_PARTS = tuple(f"rss_{part}_{proc}" for proc in ("engine_core", "worker") for part in ("anon", "file", "shmem"))
STORE_SLOPE_FIELDS = ("index_blocks", "index_bytes", "scheduler_requests", "scheduler_jobs")
