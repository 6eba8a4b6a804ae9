"""Slow and failing disk (``--mode slow-disk``).

Slow-disk workload (``--mode slow-disk``): trials of a 3,072-token prefix
stored (A), pushed out of the CPU tier by two fillers, then hit from SSD (B),
plus a batch of misses and a batch mixing misses with an SSD hit, run side by
side (step by step, alternating) on the kvplug engine and on vLLM alone.
Phases: ``normal``; ``slow10`` / ``slow100`` (every SSD read takes 10x / 100x
as long as it did: the wrapper sleeps (factor - 1) times the read's own
duration); ``fail_every3`` (every 3rd SSD read raises EIO). Reported: TTFT of
SSD hits against vLLM alone recomputing the same prompt, outputs identical,
errors counted, miss throughput against vLLM alone.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from . import trace
from .compare import failed, identical, prefix_cache_control
from .engines import kvplug_config, start_engines
from .environment import model_path
from .slow_disk_report import summarize_slow_disk
from .slow_disk_trace import row_timelines
from .workload import PHASES, slow_disk_workload


def run_slow_disk(args, workdir: Path, log=print) -> dict:
    t_start = time.monotonic()
    model = model_path()
    steps, prompts = slow_disk_workload(args.trials, args.seed, args.phases.split(","),
                                        prefix_tokens=args.slow_prefix_tokens)
    kv = kvplug_config(workdir / "ssd", args.slow_cpu_bytes, args.slow_ssd_bytes, load_policy=args.load_policy,
                       promotion_min_wait_s=args.slow_min_wait_s)
    max_len = max(2048, args.slow_prefix_tokens + 32 + args.max_tokens + 16)
    log(f"slow disk: {len(steps)} steps x 2 engines; starting the kvplug engine and vLLM alone")
    traced = {"SOAK_TRACE": "1"}  # trace.py: each engine's steps, kvplug's promotions, SSD reads
    eng, ref = start_engines([
        dict(name="kvplug", workdir=workdir, model=model, kvplug=kv, max_model_len=max_len, ctl_dir=workdir / "ctl",
             env=traced),
        dict(name="vllm", workdir=workdir, model=model, kvplug=None, max_model_len=max_len,
             ctl_dir=workdir / "ctl-vllm", env=traced),
    ])
    starts = {"kvplug": round(eng.start_wall_s, 1), "vllm": round(ref.start_wall_s, 1)}
    rows = []
    try:
        # Warm both engines alike (first-call costs), outside the figures.
        import numpy as np

        rng = np.random.RandomState(args.seed + 99)
        warm = [rng.randint(4, 2000, size=n).tolist() for n in (1056, 384)]  # prompts of no step
        for e in (eng, ref):
            e.generate(warm, args.max_tokens)
        phase = None
        for k, st in enumerate(steps):
            if st["phase"] != phase:
                phase = st["phase"]
                eng.drain(1.0)
                eng.fault("clear")
                fault = dict(PHASES)[phase]
                if fault:
                    eng.fault(**fault)
                log(f"  phase {phase}")
            ps = [prompts[x] for x in st["keys"]]
            before_c, before_s = eng.counters(), eng.snapshot() or {}
            pair = {}
            for e in ((ref, eng) if k % 2 == 0 else (eng, ref)):  # alternate who goes first
                pair[e.name] = e.generate(ps, args.max_tokens)
            after_c, after_s = eng.counters(), eng.snapshot(newer_than=time.time()) or {}
            rows.append({**st, "kv": pair["kvplug"], "ref": pair["vllm"], "prompts": ps,
                         "counters": {c: after_c.get(c, 0) - before_c.get(c, 0) for c in after_c
                                      if after_c.get(c, 0) != before_c.get(c, 0)},
                         "ssd": _delta(before_s, after_s)})
        eng.drain(2.0)
        end_snap = eng.snapshot(newer_than=time.time()) or {}
    finally:
        closer = threading.Thread(target=ref.close)
        closer.start()
        log_text = eng.close()
        closer.join()
    lines = {"kv": trace.load(workdir / "ctl"), "ref": trace.load(workdir / "ctl-vllm")}
    for row in rows:
        for side in ("kv", "ref"):
            if "results" in row[side]:
                row[f"timeline_{side}"] = row_timelines(lines[side], row[side]["results"])
    cases = []
    for row in rows:
        if "error" in row["kv"] or "error" in row["ref"]:
            continue
        for key, prompt, a, b in zip(row["keys"], row["prompts"], row["kv"]["results"], row["ref"]["results"]):
            if not failed(a) and not failed(b) and not identical(a, b):
                cases.append({"key": key, "prompt": prompt, "hit": a["cached_tokens"], "kvplug": a, "vllm": b})
    control = prefix_cache_control(model, workdir, cases[:args.control_max], args.max_tokens, max_len, log) \
        if args.control_max else []
    return summarize_slow_disk(args, {"rows": rows, "starts": starts, "end_snap": end_snap, "kv": kv,
                                      "t_start": t_start, "model": model, "log": log_text,
                                      "control": [dict(c, key=x["key"]) for x, c in zip(cases, control)]})


def _delta(before: dict, after: dict) -> dict:
    """What the SSD tier and the fault wrapper counted between two snapshots."""
    b, a = before.get("store", {}).get("ssd", {}), after.get("store", {}).get("ssd", {})
    out = {k: a.get(k, 0) - b.get(k, 0) for k in ("reads", "read_hits", "read_misses", "io_faults", "corruptions")
           if isinstance(a.get(k, 0), (int, float)) and a.get(k, 0) != b.get(k, 0)}
    bi, ai = before.get("injected", {}), after.get("injected", {})
    out["injected"] = {k: ai[k] - bi.get(k, 0) for k in ai if ai[k] != bi.get(k, 0)}
    out["read_latency_median_s"] = after.get("read_latency_s", {}).get("median")
    return out
