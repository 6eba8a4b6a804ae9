"""``kvplug bench run`` / ``kvplug bench report``: the serving bench.

run:    starts one ``kvplug serve`` per configuration (same model, thread
        layout and vLLM KV memory, set below the workload's working set),
        drives it through the OpenAI API with streaming at each concurrency
        and writes one results file per run (machine, versions, load average,
        exact configuration, every request's TTFT / inter-token gaps / TPOT /
        end-to-end time, hit tokens per tier, bytes kvplug loaded and saved
        and bytes each backing tier read and wrote, peak RSS and CPU seconds of the server tree).
report: plots (TTFT p50/p90 per configuration, throughput vs concurrency,
        hit rate per tier) and the README figures table, from results files.

    kvplug bench run --workload chat            # every configuration, concurrency = users
    kvplug bench report --write README.md
"""

from __future__ import annotations

import argparse

DEFAULT_OUT = "bench/results/serve"
CONFIG_NAMES = ["vllm", "kvplug-raw", "kvplug-int4h", "kvplug-cpu-small", "kvplug-cpu-small-ssd", "lmcache"]


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="serving bench: run workloads against vLLM alone, kvplug and LMCache; report",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bs = p.add_subparsers(dest="bench_command", required=True, metavar="{run,report}")

    r = bs.add_parser("run", help="run workloads, one results file per configuration and concurrency",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("--workload", choices=["chat", "docqa", "noreuse"], default="chat")
    r.add_argument("--configs", default=",".join(CONFIG_NAMES),
                   help=f"comma-separated, from: {', '.join(CONFIG_NAMES)}")
    r.add_argument("--concurrency", default=None,
                   help="comma-separated concurrencies (default: users for chat, 4 otherwise)")
    r.add_argument("--repeat", type=int, default=1, help="runs of each configuration; results files are numbered "
                   "-1, -2, ... and never replaced (give --out a new directory for a fresh set)")
    r.add_argument("--model", default="bench", help="'bench' (~88M-parameter synthetic Llama), 'tiny', or a "
                   "model directory")
    r.add_argument("--out", default=DEFAULT_OUT, help="results directory")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--kv-fraction", type=float, default=0.3,
                   help="vLLM's own KV memory as a fraction of the workload's working set")
    r.add_argument("--cpu-bytes", default=None, help="kvplug CPU tier / LMCache L1 (default: 2x the working set)")
    r.add_argument("--request-timeout", type=float, default=600,
                   help="seconds a request may take from being sent to its last token; longer: it fails")
    r.add_argument("--run-deadline", type=float, default=3600,
                   help="seconds one configuration's workload may take; at the deadline the unfinished "
                        "requests fail and the results file says so")
    r.add_argument("--small-cpu-fraction", type=float, default=0.33,
                   help="the small CPU tier as a fraction of the working set")
    g = r.add_argument_group("workload sizes (defaults: chat 8 users x 4 rounds; docqa 4 docs x 4 questions; "
                             "noreuse 16 prompts of 1000 tokens)")
    for flag, kind in (("--users", int), ("--rounds", int), ("--system-tokens", int), ("--doc-tokens", int),
                       ("--new-min", int), ("--new-max", int), ("--think-s", float), ("--docs", int),
                       ("--questions", int), ("--prompts", int), ("--prompt-tokens", int),
                       ("--output-tokens", int)):
        g.add_argument(flag, type=kind, default=None)
    r.set_defaults(run=run)

    rep = bs.add_parser("report", help="plots and the README table from results files",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    rep.add_argument("--results", default=DEFAULT_OUT, help="results directory")
    rep.add_argument("--plots", default=None, help="where the PNGs go (default: the results directory)")
    rep.add_argument("--write", metavar="README", default=None,
                     help="replace the generated part of this README's Benchmarks section")
    rep.set_defaults(run=report)


SIZE_KEYS = {"chat": ("users", "rounds", "system_tokens", "doc_tokens", "new_min", "new_max", "think_s",
                      "output_tokens"),
             "docqa": ("docs", "questions", "doc_tokens", "output_tokens"),
             "noreuse": ("prompts", "prompt_tokens", "output_tokens")}


def _flags(keys) -> str:
    return ", ".join(dict.fromkeys("--" + k.replace("_", "-") for k in keys))


def run(args) -> int:
    from pathlib import Path

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kvplug.bench import runner, workloads
    from kvplug.bench.configs import configurations
    from kvplug.config import parse_size

    console = Console()
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [n for n in names if n not in CONFIG_NAMES]
    if unknown:
        console.print(f"kvplug bench run: --configs {','.join(unknown)} not known; expected {', '.join(CONFIG_NAMES)}")
        return 2
    foreign = [k for ks in SIZE_KEYS.values() for k in ks
               if k not in SIZE_KEYS[args.workload] and getattr(args, k) is not None]
    if foreign:
        console.print(f"kvplug bench run: {_flags(foreign)} do(es) not size the {args.workload} workload; its "
                      f"sizes are {_flags(SIZE_KEYS[args.workload])}")
        return 2
    model = runner.model_path(args.model)
    info = runner.model_info(model)
    sizes = {k: getattr(args, k) for k in SIZE_KEYS[args.workload]}
    workload = workloads.build(args.workload, info["vocab"], seed=args.seed, **sizes)
    sizing = runner.Sizing.of(workload, info, args.kv_fraction)
    ws = sizing.working_set_bytes
    cpu = parse_size(args.cpu_bytes) if args.cpu_bytes else max(2 * ws, 64 << 20)
    configs = configurations(cpu, int(ws * args.small_cpu_fraction), max(4 * ws, 1 << 30))
    default_c = workload.params.get("users", 4)
    concurrencies = [int(c) for c in args.concurrency.split(",")] if args.concurrency else [default_c]
    d = workload.describe()
    console.print(f"[bold]{workload.name}[/]: {d['requests']} requests, {d['prompt_tokens']:,} prompt tokens, "
                  f"working set {d['unique_tokens']:,} tokens ({ws / 2**20:.0f} MiB of KV); vLLM KV "
                  f"{sizing.kv_blocks} blocks ({sizing.kv_blocks * runner.BLOCK:,} tokens); model {model}")
    out = Path(args.out)
    session = runner.new_session()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        for rep in range(1, args.repeat + 1):
            for c in concurrencies:
                for name in names:
                    path = runner.run_one(configs[name], workload, c, model, sizing, out, rep, progress,
                                            session=session, request_timeout_s=args.request_timeout,
                                            deadline_s=args.run_deadline)
                    console.print(_line(path))
    return 0


def _line(path) -> str:
    import json

    from rich.markup import escape

    doc = json.loads(path.read_text())
    if doc["status"] != "ok":
        return f"  {doc['config']['name']}: [red]{doc['status']}[/]: {escape(doc.get('why', '')[:300])} -> {path}"
    s = doc["summary"]
    return (f"  {doc['config']['name']}: TTFT p50 {s['ttft_s']['p50']:.3f} s p90 {s['ttft_s']['p90']:.3f} s, "
            f"{s['throughput_rps']:.3f} req/s, {s['output_tok_s']:.1f} out tok/s, prefill computed "
            f"{s['prefill_tokens_computed']:,} (floor {s['prefill_floor_tokens']:,}) -> {path}")


def report(args) -> int:
    from pathlib import Path

    from kvplug.bench import report as rep

    results = Path(args.results)
    docs = rep.load(results)
    if not docs:
        print(f"kvplug bench report: no results files in {results}; run 'kvplug bench run' first")
        return 2
    plots = rep.plot_all(docs, Path(args.plots) if args.plots else results)
    table = rep.markdown(docs, plots, Path(args.write).resolve().parent if args.write else Path.cwd())
    print(table)
    if args.write:
        rep.write_readme(Path(args.write), table)
        print(f"wrote the Benchmarks table into {args.write}")
    return 0
