"""The slow-disk results (slow_disk.json): per phase, SSD-hit TTFT against vLLM alone
recomputing, outputs compared, errors counted, miss throughput; the targets."""

from __future__ import annotations

import time

from .compare import difference, failed, identical
from .engine_logs import log_findings
from .engines import ENV
from .environment import code_state, machine, model_info
from .workload import PHASES


def _miss_throughput(results: list[dict], prompts: list[list[int]], miss_idx: list[int], wall_s: float) -> float:
    """Tokens (prompt + generated) of the misses per second, from the batch's start to the
    last miss's last token (engine-core timestamps)."""
    tokens = sum(len(prompts[i]) + len(results[i]["token_ids"]) for i in miss_idx)
    ts = [r["ts"] for r in results]
    if all(ts):
        start = min(t[0] for t in ts)
        end = max(ts[i][3] for i in miss_idx)
        if end > start:
            return tokens / (end - start)
    return tokens / wall_s


def summarize_slow_disk(args, v: dict) -> dict:
    import statistics

    rows = v["rows"]
    reproduced = sum(1 for c in v["control"] if c.get("same_as_kvplug"))
    failed_n = changed = compared = 0
    changed_detail = []
    phases = {}
    for row in rows:
        kv, ref = row["kv"], row["ref"]
        if "error" in kv or "error" in ref:
            failed_n += len(row["keys"]) if "error" in kv else 0
            continue
        tl_kv = row.get("timeline_kv") or [None] * len(row["keys"])
        tl_ref = row.get("timeline_ref") or [None] * len(row["keys"])
        for key, a, b, tk, tr in zip(row["keys"], kv["results"], ref["results"], tl_kv, tl_ref):
            failed_n += failed(a)
            compared += 1
            if not identical(a, b):
                changed += 1
                changed_detail.append({"phase": row["phase"], "step": row["step"], "key": key,
                                       "cached_tokens": a["cached_tokens"], **difference(a, b),
                                       "step_counters": row["counters"], "step_ssd": row["ssd"],
                                       "steps_kvplug": _shape(tk), "steps_vllm": _shape(tr)})
        ph = phases.setdefault(row["phase"], {"B": [], "A": [], "MISS": [], "MIX": [], "counters": {}, "ssd": {}})
        for c, d in row["counters"].items():
            ph["counters"][c] = ph["counters"].get(c, 0) + d
        for c, d in row["ssd"].items():
            if isinstance(d, (int, float)) and c != "read_latency_median_s":
                ph["ssd"][c] = ph["ssd"].get(c, 0) + d
            elif c == "injected":
                for kk, dd in d.items():
                    ph["ssd"].setdefault("injected", {})
                    ph["ssd"]["injected"][kk] = ph["ssd"]["injected"].get(kk, 0) + dd
        ph["ssd"]["read_latency_median_s"] = row["ssd"].get("read_latency_median_s")
        if row["step"] in ("A", "B"):
            a, b = kv["results"][0], ref["results"][0]
            ph[row["step"]].append({"trial": row["trial"], "kvplug_ttft_s": round(a["ttft_s"], 4),
                                    "vllm_ttft_s": round(b["ttft_s"], 4), "ratio": round(a["ttft_s"] / b["ttft_s"], 3),
                                    "hit_tokens": a["cached_tokens"],
                                    "hit_tokens_ssd": row["counters"].get("hit_tokens_ssd", 0),
                                    "promotion_timeouts": row["counters"].get("promotion_timeouts", 0),
                                    "promotion_failed_blocks": row["counters"].get("promotion_failed_blocks", 0),
                                    "timeline": tl_kv[0] if row["step"] == "B" else None})
        elif row["step"] in ("MISS", "MIX"):
            miss = list(range(len(row["keys"]))) if row["step"] == "MISS" else list(range(1, len(row["keys"])))
            tk = _miss_throughput(kv["results"], row["prompts"], miss, kv["wall_s"])
            tr = _miss_throughput(ref["results"], row["prompts"], miss, ref["wall_s"])
            ph[row["step"]].append({"trial": row["trial"], "kvplug_tokens_per_s": round(tk, 1),
                                    "vllm_tokens_per_s": round(tr, 1), "ratio": round(tk / tr, 3),
                                    "hit_request_ttft_s": round(kv["results"][0]["ttft_s"], 4) if row["step"] == "MIX" else None,
                                    "hit_request_cached": kv["results"][0]["cached_tokens"] if row["step"] == "MIX" else None})
    out_phases = {}
    for name, ph in phases.items():
        b = ph["B"]
        ratios = [x["ratio"] for x in b]
        miss_r = [x["ratio"] for x in ph["MISS"]]
        vllm_tps = [x["vllm_tokens_per_s"] for x in ph["MISS"]]
        noise = statistics.pstdev(vllm_tps) / statistics.mean(vllm_tps) if len(vllm_tps) > 1 else None
        out_phases[name] = {
            "fault": dict(PHASES)[name],
            "ssd_hit_B": b, "cold_A": ph["A"],
            "ssd_hit_ttft_over_recompute": {"median": _med(ratios), "max": max(ratios) if ratios else None},
            "cold_ttft_over_vllm": {"median": _med([x["ratio"] for x in ph["A"]])},
            "miss_batches": ph["MISS"], "mixed_batches": ph["MIX"],
            "miss_throughput_kvplug_over_vllm": {"median": _med(miss_r), "min": min(miss_r) if miss_r else None,
                                                 "vllm_run_to_run_cv": round(noise, 3) if noise is not None else None},
            "mixed_miss_throughput_kvplug_over_vllm": {"median": _med([x["ratio"] for x in ph["MIX"]])},
            "kvplug_counters": ph["counters"], "ssd_and_injected": ph["ssd"],
        }
    slow = out_phases.get("slow100", {})
    fail = out_phases.get("fail_every3", {})
    miss_all = [x["ratio"] for p in out_phases.values() for x in p["miss_batches"]]
    return {
        "what": "kvplug under a slow and a failing SSD (faults injected in the I/O layer inside EngineCore), "
                "side by side with vLLM alone (no kvplug, same thread layout, the same prompts step by step)",
        "machine": machine(), "code": code_state(), "model": model_info(v["model"]),
        "config": {"trials_per_phase": args.trials, "seed": args.seed, "max_tokens": args.max_tokens,
                   "prefix_tokens": args.slow_prefix_tokens, "suffix_tokens": 32, "miss_prompt_tokens": 384,
                   "kvplug": {k: val for k, val in v["kv"].items() if k != "ssd_path"} | {"ssd_path": "<temp dir>"},
                   "engine_env": ENV, "phases": dict(PHASES),
                   "slow": "each SSD read (preadv) sleeps (factor - 1) x its own measured duration after it",
                   "steps": "A = P+a (stores P), F = two fillers (push P out of the CPU tier), B = P+b (SSD hit), "
                            "MIX = [previous P + c, 3 misses], MISS = 4 misses; ttft from RequestOutput.metrics"},
        "wall_s": round(time.monotonic() - v["t_start"], 1), "engine_start_s": v["starts"],
        "requests_compared": compared, "outputs_identical": compared - changed, "outputs_changed": changed,
        "changed_detail": changed_detail[:20], "failed_requests": failed_n,
        "changed_control": {
            "what": "each changed output replayed on vLLM with its own prefix cache hitting the same tokens: "
                    "same_as_kvplug means vLLM's prefix cache gives kvplug's output (the difference is vLLM's)",
            "reproduced_by_vllm_prefix_cache": reproduced, "cases": v["control"]},
        "phases": out_phases,
        "targets": {
            "slow100_ssd_hit_ttft_le_recompute_plus_10pct": {
                "max_ratio": slow.get("ssd_hit_ttft_over_recompute", {}).get("max"),
                "median_ratio": slow.get("ssd_hit_ttft_over_recompute", {}).get("median"),
                "met": (slow.get("ssd_hit_ttft_over_recompute", {}).get("max") or 99) <= 1.10},
            "fail_every3_outputs_identical_and_errors_counted": {
                "read_errors_injected": fail.get("ssd_and_injected", {}).get("injected", {}).get("fail_every", 0),
                "ssd_io_faults_counted": fail.get("ssd_and_injected", {}).get("io_faults", 0),
                "promotion_failed_blocks": fail.get("kvplug_counters", {}).get("promotion_failed_blocks", 0),
                "outputs_changed": changed, "changed_reproduced_by_vllm_prefix_cache": reproduced,
                "met": changed - reproduced == 0 and failed_n == 0
                and fail.get("ssd_and_injected", {}).get("io_faults", 0) > 0,
                "met_strictly": changed == 0 and failed_n == 0},
            "miss_throughput_unaffected": {
                "median_ratio_all_phases": _med(miss_all),
                "per_phase_median": {n: p["miss_throughput_kvplug_over_vllm"]["median"] for n, p in out_phases.items()},
                "vllm_run_to_run_cv": {n: p["miss_throughput_kvplug_over_vllm"]["vllm_run_to_run_cv"]
                                       for n, p in out_phases.items()}},
        },
        "leaks_at_end": {"pinned_blocks": v["end_snap"].get("store", {}).get("cpu", {}).get("pinned_blocks"),
                         "ssd_read_pins": v["end_snap"].get("ssd_read_pins"),
                         "scheduler_request_states": v["end_snap"].get("scheduler_reqs")},
        "store_stats_end": v["end_snap"].get("store"),
        "engine_log_warnings": log_findings(v["log"]),
    }


def _shape(tl: dict | None) -> list | None:
    """The steps that computed a request: (tokens, tokens it had before, the others' tokens)."""
    if tl is None:
        return None
    return [[s["tokens"], s["computed_before"], sorted(s["batch"].values())] for s in tl["steps"]]


def _med(xs):
    import statistics

    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 3) if xs else None
