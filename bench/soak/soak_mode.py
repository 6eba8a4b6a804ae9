"""The soak (``--mode soak``): the same requests, in the same batches, through the kvplug engine
(faults injected) and, side by side, through vLLM alone.

Soak workload: prompts are one of ``--prefixes`` shared prefixes (128-448
tokens, some not block-aligned) plus either one of ``--suffixes`` pool
suffixes (repeats: token-granular full hits) or a fresh unique suffix
(``--unique``: misses past the prefix, churn that makes both tiers evict), or
share nothing (``--fresh``: misses), in generate() calls of 1-4 prompts. Every ``--fault-every`` requests a fault is
armed, in turn: ``read_error`` (3 SSD reads raise EIO), ``slow_read`` (4 reads
take 0.5 s more), ``enospc`` (16 writes raise ENOSPC), ``bitflip`` (2 reads
return a flipped byte the checksum must catch). Reported: RSS and fd slopes
after warm-up (growth per 1,000 requests), pins and request states left at
the end (leaks), failed requests, faults fired and survived, corruptions
detected, outputs identical to vLLM alone. Memory (``memory`` in soak.json): each
engine's EngineCore and worker are probed from inside (probe.py) at every sample, so
the worker's growth splits into what malloc hands out (something keeps it) and what it
holds free (fragmentation), side by side with vLLM alone's; ``--memray`` names the
native stacks of what was never freed (native_leaks.py). 2,000 requests take about 3
minutes on 2 cores (2 x 40 s of it engine start).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from .compare import failed, identical, prefix_cache_control
from .engines import SOAK_ENV, Engine, engine_env, kvplug_config, start_engines
from .environment import model_path
from .sampling import sample
from .soak_report import summarize_soak
from .workload import FAULTS, batch_bounds, soak_workload


def drive(engine: Engine, reqs: list[dict], prompts: dict[str, list[int]], bounds: list[tuple[int, int]],
          args, faults: bool, log=None) -> dict:
    """Run the requests through one engine, one generate() call per batch, sampling as it goes
    and (``faults``) arming a fault every ``args.fault_every`` requests."""
    n = len(reqs)
    faults_at = ([int(args.fault_every * (k + 0.5)) for k in range(n) if args.fault_every * (k + 0.5) < n]
                 if faults and args.fault_every else [])
    events: list[dict] = []
    results: list[dict | None] = [None] * n
    errors: dict[int, str] = {}
    series: list[dict] = []
    t0 = time.monotonic()
    hits = nfailed = 0
    warm = int(n * args.warmup)
    tracing = False

    def take(end: int) -> dict:
        nonlocal tracing
        trace = native = None
        if (args.tracemalloc or args.memray) and not tracing and end >= warm:
            tracing = True
            trace, native = "start" if args.tracemalloc else None, "start" if args.memray else None
        return sample(engine, end, t0, hits, nfailed, trim=args.trim_before_sample, trace=trace, native=native)

    series.append(take(0))
    next_sample = args.sample_every
    for start, end in bounds:
        while faults_at and faults_at[0] <= start:
            at = faults_at.pop(0)
            kind, params = FAULTS[len(events) % len(FAULTS)]
            before = series[-1]
            engine.fault(kind, **params)
            events.append({"kind": kind, "params": params, "at_request": start, "scheduled_at": at,
                           "sample_before": len(series) - 1, "injected_before": before["injected"].get(kind, 0)})
        res = engine.generate([prompts[r["key"]] for r in reqs[start:end]], args.max_tokens)
        for j in range(end - start):
            out = None if "error" in res else res["results"][j]
            if out is None:
                errors[start + j] = res["error"][-2000:]
            results[start + j] = out
            nfailed += failed(out)
            hits += bool(out and out["cached_tokens"])
        if end >= next_sample or end == n:
            series.append(take(end))
            next_sample = (end // args.sample_every + 1) * args.sample_every
            if log and len(series) % 10 == 0:
                x = series[-1]
                log(f"  {engine.name}: {end:5d} requests, {x['t_s']:6.1f} s: hits {hits}, failed {nfailed}, "
                    f"RSS {x['rss_total'] / 2**20:,.0f} MiB, fds {x['fds_total']}")
    run_s = time.monotonic() - t0
    # The end: let tails and write-backs finish; then nothing may be pinned or held.
    engine.drain(2.0)
    time.sleep(1.0)
    end_sample = sample(engine, n, t0, hits, nfailed, trim=args.trim_before_sample,
                        trace="diff" if tracing and args.tracemalloc else None,
                        native="stop" if tracing and args.memray else None)
    end_snap = engine.snapshot(newer_than=time.time()) or {}
    return {"results": results, "errors": errors, "series": series, "events": events, "run_s": run_s,
            "end_sample": end_sample, "end_snap": end_snap}


def run_soak(args, workdir: Path, log=print) -> dict:
    """The soak: the same requests, in the same batches, through the kvplug engine (faults
    injected) and, side by side, through vLLM alone (outputs to compare, RSS to compare)."""
    t_start = time.monotonic()
    model = model_path()
    reqs, prompts = soak_workload(args.requests, args.seed, args.prefixes, args.suffixes, args.unique, args.fresh)
    bounds = batch_bounds(args.requests, args.seed, args.batch_max)
    kv = kvplug_config(workdir / "ssd", args.cpu_bytes, args.ssd_bytes)
    max_model_len = 1024
    menv = engine_env(args.engine_env)
    log(f"soak: {args.requests} requests, {len(prompts)} distinct prompts, {len(bounds)} generate() calls; "
        f"starting the kvplug engine and vLLM alone side by side")
    specs = [
        dict(name="kvplug", workdir=workdir, model=model, kvplug=kv, max_model_len=max_model_len,
             ctl_dir=workdir / "ctl", probe_dir=workdir / "probe-kvplug", env={**SOAK_ENV["kvplug"], **menv}),
        dict(name="vllm", workdir=workdir, model=model, kvplug=None, max_model_len=max_model_len,
             probe_dir=workdir / "probe-vllm", env={**SOAK_ENV["vllm"], **menv}),
    ]
    engines = start_engines(specs)
    starts = {e.name: round(e.start_wall_s, 1) for e in engines}
    runs: dict[str, dict] = {}
    errors: list[BaseException] = []

    def go(engine, faults):
        try:
            runs[engine.name] = drive(engine, reqs, prompts, bounds, args, faults, log)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=go, args=(e, e.name == "kvplug")) for e in engines]
    logs = {}
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        closers = {e.name: threading.Thread(target=lambda e=e: logs.__setitem__(e.name, e.close())) for e in engines}
        for t in closers.values():
            t.start()
        for t in closers.values():
            t.join()
    if errors:
        raise errors[0]
    a, b = runs["kvplug"]["results"], runs["vllm"]["results"]
    differing = [i for i in range(len(reqs)) if not failed(a[i]) and not failed(b[i]) and not identical(a[i], b[i])]
    control = prefix_cache_control(model, workdir, [
        {"prompt": prompts[reqs[i]["key"]], "hit": a[i]["cached_tokens"], "kvplug": a[i], "vllm": b[i]}
        for i in differing[:args.control_max]], args.max_tokens, max_model_len, log) if args.control_max else []
    return summarize_soak(args, {
        "reqs": reqs, "prompts": prompts, "bounds": bounds, "kv": kv, "max_model_len": max_model_len,
        "t_start": t_start, "starts": starts, "model": model, "runs": runs, "logs": logs,
        "control": [dict(c, request=i) for i, c in zip(differing, control)]})
