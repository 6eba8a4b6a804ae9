"""``kvplug demo`` (what ``make demo`` runs): TTFT cold, CPU-tier hit, SSD hit after a restart.

No GPU and no download: it builds a small random-weight Llama (cached under
~/.cache/kvplug), serves it with ``kvplug serve`` (CPU tier + an SSD tier in
a temporary directory, codec raw, vLLM's own prefix cache off so that every
hit is kvplug's), sends streamed OpenAI requests that share a long prefix,
then restarts the server on the same SSD directory and sends one more. It
prints each request's time to first token and kvplug's counters.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="serve a small local model with kvplug; TTFT cold / CPU hit / SSD hit",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny', 'bench' (~88M parameters, slower) or a model dir")
    p.add_argument("--prefix-tokens", type=int, default=2048, help="tokens the requests share")
    p.add_argument("--suffix-tokens", type=int, default=32, help="tokens of each request's own question")
    p.set_defaults(run=run)


def _serve(model: str, work: Path, name: str, max_model_len: int):
    from kvplug.bench.configs import ENV
    from kvplug.bench.server import Server, free_port, kvplug_command

    port = free_port()
    cmd = [*kvplug_command(), "serve", model, "--host", "127.0.0.1", "--port", str(port), "--served-model-name",
           "demo", "--max-model-len", str(max_model_len), "--enforce-eager", "--no-enable-prefix-caching",
           "--kvplug-cpu-bytes", "256MiB", "--kvplug-ssd-path", str(work / "ssd"), "--kvplug-ssd-bytes", "1GiB",
           "--kvplug-codec", "raw"]
    server = Server(name, cmd, work / f"{name}.log", ENV)
    t0 = time.monotonic()
    server.wait_http(f"http://127.0.0.1:{port}/health", 600)
    return server, f"http://127.0.0.1:{port}", time.monotonic() - t0


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from kvplug.bench import client, metrics, runner
    from kvplug.bench.server import ServerFailed
    from kvplug.bench.workloads import Request

    c = Console()
    c.print("[bold]kvplug demo[/]: vLLM on CPU, its KV cache kept in kvplug's CPU and SSD tiers\n")
    c.print(f"model: {args.model} (a random-weight Llama built locally on first use) ...")
    model = runner.model_path(args.model)
    info = runner.model_info(model)
    rng = random.Random(1)
    prefix = [rng.randrange(16, info["vocab"]) for _ in range(args.prefix_tokens)]

    def prompt(first: int) -> list[int]:  # a different first suffix token: the shared part is exactly the prefix
        return prefix + [first] + [rng.randrange(16, info["vocab"]) for _ in range(args.suffix_tokens - 1)]

    prompts = {name: prompt(10 + i) for i, name in enumerate("ABCD")}
    max_model_len = -(-(args.prefix_tokens + args.suffix_tokens + 8) // 128) * 128
    work = Path(tempfile.mkdtemp(prefix="kvplug-demo-"))
    ttft, hits = {}, {}
    try:
        for engine, names in (("engine 1", "ABC"), ("engine 2 (restarted, same SSD directory)", "D")):
            c.print(f"\n[bold]{engine}[/]: kvplug serve (CPU tier 256 MiB, SSD tier in {work / 'ssd'}); starting ...")
            server, url, start_s = _serve(model, work, engine.split(" (")[0].replace(" ", ""), max_model_len)
            try:
                c.print(f"  up in {start_s:.0f} s")
                for name in names:
                    before = metrics.kvplug_counters(metrics.scrape(url))
                    (res,), _ = client.drive(url, "demo", [Request(name, name, 0, prompts[name], 8)], 1)
                    if "error" in res:
                        raise ServerFailed(f"request {name}: {res['error']}")
                    ttft[name] = res["ttft_s"]
                    time.sleep(2.5)  # kvplug's counters reach /metrics with the engine's next stats
                    hits[name] = metrics.delta(metrics.kvplug_counters(metrics.scrape(url)), before)
            finally:
                server.stop()
    except ServerFailed as e:
        c.print(f"[red]demo failed:[/] {e}\nlogs kept in {work}")
        return 1
    shutil.rmtree(work, ignore_errors=True)
    table = Table(title=f"Time to first token, {args.prefix_tokens + args.suffix_tokens}-token prompts "
                        f"({args.prefix_tokens} shared)")
    for col in ("request", "TTFT (s)", "hit tokens", "from", "vs cold"):
        table.add_column(col, justify="right" if col != "request" else "left")
    for name, label in (("A", "A  cold (empty store)"), ("B", "B  shared prefix"), ("C", "C  shared prefix"),
                        ("D", "D  after a restart")):
        h = hits[name]
        src = "CPU tier" if h.get("hit_tokens_cpu") else "SSD tier" if h.get("hit_tokens_ssd") else "prefill"
        table.add_row(label, f"{ttft[name]:.3f}", f"{h.get('hit_tokens', 0):,.0f}", src,
                      f"{ttft[name] / ttft['A']:.3f}")
    c.print(table)
    c.print("TTFT: request sent -> first streamed token (OpenAI API, streaming)")
    ok = hits["B"].get("hit_tokens_cpu", 0) > 0 and hits["D"].get("hit_tokens_ssd", 0) > 0
    if not ok:
        c.print("[red]expected a CPU-tier hit for B and an SSD hit for D; did not get them[/]")
    return 0 if ok else 1
