"""Outputs against vLLM alone's: identical or where they part, failed, and the replay of a
differing output on vLLM's own prefix cache (is the difference vLLM's?)."""

from __future__ import annotations

from pathlib import Path

from .engines import BLOCK, SOAK_ENV, Engine


def identical(a: dict, b: dict) -> bool:
    """Identical greedy tokens and identical top-5 logprobs at every position."""
    return a["token_ids"] == b["token_ids"] and a["logprobs"] == b["logprobs"]


def difference(a: dict, b: dict) -> dict:
    """Where two outputs part: the first differing token and the largest top-5 logprob gap."""
    first = next((i for i, (x, y) in enumerate(zip(a["token_ids"], b["token_ids"])) if x != y), None)
    gap = 0.0
    for la, lb in zip(a["logprobs"], b["logprobs"]):
        for t in set(la) & set(lb):
            gap = max(gap, abs(la[t] - lb[t]))
    return {"first_token_differing": first, "max_logprob_gap": round(gap, 6),
            "tokens": a["token_ids"], "other_tokens": b["token_ids"]}


def prefix_cache_control(model: str, workdir: Path, cases: list[dict], max_tokens: int, max_model_len: int,
                         log=print) -> list[dict]:
    """For outputs that differ from vLLM alone: does vLLM's *own* prefix cache, hitting the very
    same tokens, give kvplug's output? (Then the difference is vLLM's: on its CPU backend a
    prefill over cached context is not always bit-identical to one prefill of the whole prompt.)

    ``cases``: {"prompt", "hit" (tokens kvplug loaded), "kvplug": output, "vllm": output}. Only
    block-aligned hits can be replayed (vLLM caches full blocks); the others are "not checkable"."""
    out = [{"hit": c["hit"], "checkable": c["hit"] > 0 and c["hit"] % BLOCK == 0} for c in cases]
    todo = [i for i, o in enumerate(out) if o["checkable"]]
    if not todo:
        return out
    log(f"control: {len(todo)} differing outputs replayed with vLLM's own prefix cache")
    eng = Engine("vllm_prefix_cache", workdir, model, kvplug=None, max_model_len=max_model_len,
                 prefix_caching=True, env=SOAK_ENV["kvplug"])
    try:
        for i in todo:
            c, o = cases[i], out[i]
            prompt, h = c["prompt"], c["hit"]
            eng.call({"cmd": "reset_prefix_cache"})
            # The first h tokens and one that differs from the prompt's next: vLLM caches h/128 full blocks.
            eng.generate([prompt[:h] + [4 if prompt[h] != 4 else 5]], 1)
            res = eng.generate([prompt], max_tokens)["results"][0]
            o["vllm_prefix_cache_hit"] = res["cached_tokens"]
            o["same_as_kvplug"] = res["cached_tokens"] == h and identical(res, c["kvplug"])
            o["vllm_prefix_cache_vs_vllm_alone"] = difference(res, c["vllm"])["max_logprob_gap"]
    finally:
        eng.close()
    return out


def failed(r: dict | None) -> bool:
    return r is None or r.get("finish_reason") not in ("length", "stop")
