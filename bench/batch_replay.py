"""Replay the slow-disk bench's no-hit batches with their batch shape fixed: are the logprob
differences of those requests vLLM's CPU kernels (batch shape) or kvplug's?

    python bench/batch_replay.py            # -> bench/results/batch_replay.json

The slow-disk bench's F step sends two fresh 3,104-token prompts (F1, F2) in
one generate() call; vLLM's EngineCore runs in its own process and starts a
step as soon as F1 arrives, so whether F2 is in F1's first step (prefilled in
chunks beside it) or in the next (beside F1's first decode token) depends on
when F2's request got there: timing, not kvplug. Here each engine runs in
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and this script steps it, so the
composition is fixed: ``together`` (both added before the first step),
``apart`` (F2 added after F1's first step: what the bench's traces show most
often) and ``after`` (F2 once F1 finished). Each composition runs on vLLM alone
and on kvplug (raw codec, fresh store: both prompts miss), same thread layout
(bench/soak/engines.py ENV), and on vLLM alone with the compute thread bound to
core 0 and to core 1. Greedy tokens and top-5 logprobs are compared bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

COMPOSITIONS = ("together", "apart", "after")
CONFIGS = {  # name -> (kvplug?, extra env)
    "vllm": (False, {}),
    "kvplug": (True, {}),
    "vllm_bind0": (False, {"VLLM_CPU_OMP_THREADS_BIND": "0"}),
    "vllm_bind1": (False, {"VLLM_CPU_OMP_THREADS_BIND": "1"}),
}


def worker(spec: dict) -> dict:
    """In this process: one engine, every batch in every composition; outputs by composition."""
    from vllm import LLM, SamplingParams, TokensPrompt

    kwargs = {}
    if spec["kvplug"] is not None:
        kwargs["kv_transfer_config"] = {"kv_connector": "kvplug", "kv_role": "kv_both",
                                        "kv_connector_extra_config": spec["kvplug"]}
    llm = LLM(model=spec["model"], enforce_eager=True, max_model_len=spec["max_model_len"],
              enable_prefix_caching=False, seed=0, **kwargs)
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, logprobs=5)
    n = [0]

    def add(prompt, salt):
        n[0] += 1
        rid = f"r{n[0]}"
        # A salt per composition: kvplug keys it, so a prompt replayed is never a kvplug hit
        # of its earlier run (vLLM alone, its prefix cache off, ignores it).
        engine.add_request(rid, TokensPrompt(prompt_token_ids=prompt, cache_salt=salt), params)
        return rid

    def run(batch, composition):
        done, shapes = {}, []

        def step():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
        ids = [add(batch[0], composition)]
        if composition == "together":
            ids.append(add(batch[1], composition))
        step()
        if composition == "apart":
            ids.append(add(batch[1], composition))
        while engine.has_unfinished_requests():
            step()
        if composition == "after":
            ids.append(add(batch[1], composition))
            while engine.has_unfinished_requests():
                step()
        return [{"cached_tokens": done[r].num_cached_tokens or 0, "token_ids": list(done[r].outputs[0].token_ids),
                 "logprobs": [{str(k): v.logprob for k, v in pos.items()} for pos in done[r].outputs[0].logprobs]}
                for r in ids]

    run(spec["warm"], "warm")  # first-call costs, outside the figures
    return {c: [run(b, c) for b in spec["batches"]] for c in COMPOSITIONS}


def gap(a: dict, b: dict) -> float:
    g = 0.0
    for la, lb in zip(a["logprobs"], b["logprobs"]):
        for t in set(la) & set(lb):
            g = max(g, abs(la[t] - lb[t]))
    return round(g, 6)


def compare(a: dict, b: dict) -> dict:
    return {"identical": a["token_ids"] == b["token_ids"] and a["logprobs"] == b["logprobs"],
            "tokens_identical": a["token_ids"] == b["token_ids"], "max_logprob_gap": gap(a, b),
            "cached_tokens": [a["cached_tokens"], b["cached_tokens"]]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--keys", default="normal.4,slow10.0,slow10.3,fail_every3.1,slow10.4,fail_every3.2",
                   help="F batches of the slow-disk workload whose F2 differed in slow_disk.json before")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "batch_replay.json"))
    p.add_argument("--worker", default=None)
    args = p.parse_args()
    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        Path(spec["result"]).write_text(json.dumps(worker(spec)))
        return

    import numpy as np

    from soak.engines import ENV, kvplug_config
    from soak.environment import machine, model_info, model_path
    from soak.workload import PHASES, slow_disk_workload

    t0 = time.monotonic()
    load_before = os.getloadavg()
    _, prompts = slow_disk_workload(5, 0, [n for n, _ in PHASES], prefix_tokens=3072)
    keys = args.keys.split(",")
    batches = [[prompts[f"{k}.F1"], prompts[f"{k}.F2"]] for k in keys]
    rng = np.random.RandomState(99)
    warm = [rng.randint(4, 2000, size=1056).tolist(), rng.randint(4, 2000, size=384).tolist()]
    model = model_path()
    outs = {}
    with tempfile.TemporaryDirectory(prefix="kvplug-replay-") as tmp:
        for name, (with_kvplug, env) in CONFIGS.items():
            spec = {"model": model, "max_model_len": max(2048, 3072 + 32 + args.max_tokens + 16),  # as the bench: same chunking
                    "max_tokens": args.max_tokens, "batches": batches, "warm": warm,
                    "kvplug": kvplug_config(Path(tmp) / f"ssd-{name}", "8MiB", "1GiB") if with_kvplug else None,
                    "result": str(Path(tmp) / f"{name}.json")}
            spec_path = Path(tmp) / f"{name}.spec.json"
            spec_path.write_text(json.dumps(spec))
            full_env = {**os.environ, **ENV, **env, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
            print(f"replay: {name}", flush=True)
            r = subprocess.run([sys.executable, __file__, "--worker", str(spec_path)], env=full_env,
                               capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(f"{name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
            outs[name] = json.loads(Path(spec["result"]).read_text())
    rows = []
    for i, k in enumerate(keys):
        for j, which in enumerate(("F1", "F2")):
            row = {"key": f"{k}.{which}"}
            ref = outs["vllm"]
            for c in COMPOSITIONS:
                row[f"kvplug_vs_vllm_{c}"] = compare(outs["kvplug"][c][i][j], ref[c][i][j])
                row[f"bind0_vs_bind1_{c}"] = compare(outs["vllm_bind0"][c][i][j], outs["vllm_bind1"][c][i][j])
            for a, b in (("together", "apart"), ("apart", "after"), ("together", "after")):
                row[f"vllm_{a}_vs_{b}"] = compare(ref[a][i][j], ref[b][i][j])
            rows.append(row)

    def count(field):
        return sum(r[field]["identical"] for r in rows)
    summary = {f: f"{count(f)}/{len(rows)} identical" for f in rows[0] if f != "key"}
    result = {
        "what": "the slow-disk bench's no-hit F batches (two 3,104-token prompts) replayed with a fixed batch "
                "composition on in-process engines: kvplug against vLLM alone for the same composition, "
                "vLLM alone across compositions, and vLLM alone bound to core 0 against core 1",
        "machine": machine(), "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
        "model": model_info(model), "engine_env": ENV, "compositions": {
            "together": "F1 and F2 added before the first step (F2 prefilled beside F1's prefill)",
            "apart": "F2 added after F1's first step (beside F1's first decode token)",
            "after": "F2 added once F1 finished (alone)"},
        "summary": summary, "requests": rows, "wall_s": round(time.monotonic() - t0, 1)}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
