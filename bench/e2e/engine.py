"""One vLLM engine, one configuration: run its requests in order, write what came out.

    python bench/e2e/engine.py SPEC.json OUT.json

The TTFT bench and the demo start every configuration in a fresh process with
this script, so that no configuration inherits another's caches (vLLM's prefix
cache, kvplug's CPU slab, the page cache of model weights aside). SPEC:

    {"model": DIR, "kvplug": null | {kv_connector_extra_config},
     "prefix_caching": bool, "max_model_len": int,
     "requests": [{"name": str, "prompt": [token ids], "max_tokens": int}, ...],
     "settle_s": float}   # pause after each request (SSD write-backs finish)

Each request is one generate() call with one prompt (the same batch shape in
every configuration). OUT has per request: TTFT from vLLM's own request
metrics (``RequestOutput.metrics``, a ``RequestStateStats``):
``first_token_latency`` = first token seen by the front end minus the
request's arrival (what a user waits for), split into the engine core's
queued -> scheduled (``scheduled_ts - queued_ts``: includes waiting for SSD
blocks to be promoted) and scheduled -> first token (``first_token_ts -
scheduled_ts``: the prefill step(s)); the wall time of the generate() call;
the greedy tokens; vLLM's cached-token count; and the change of each kvplug
counter (``vllm:kvplug_*``) over the request.
"""

from __future__ import annotations

import json
import sys
import time

from kvplug.tools.offline_llm import drain


def counters(llm) -> dict[str, float]:
    return {m.name.split("kvplug_", 1)[1]: m.value for m in llm.get_metrics() if "kvplug_" in m.name}


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)

    from vllm import LLM, SamplingParams, TokensPrompt

    kwargs = {}
    if spec.get("kvplug") is not None:
        kwargs["kv_transfer_config"] = {
            "kv_connector": "kvplug", "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": spec["kvplug"],
        }
    t0 = time.monotonic()
    llm = LLM(model=spec["model"], enforce_eager=True, max_model_len=spec["max_model_len"],
              enable_prefix_caching=spec["prefix_caching"], disable_log_stats=False, seed=0, **kwargs)
    out = {"engine_start_s": round(time.monotonic() - t0, 3), "requests": []}
    for req in spec["requests"]:
        before = counters(llm)
        params = SamplingParams(max_tokens=req.get("max_tokens", 8), temperature=0.0, logprobs=req.get("logprobs"))
        t = time.perf_counter()
        (r,) = llm.generate([TokensPrompt(prompt_token_ids=req["prompt"])], params, use_tqdm=False)
        wall = time.perf_counter() - t
        drain(llm, spec.get("settle_s", 0.5))
        after = counters(llm)
        m = r.metrics
        out["requests"].append({
            "name": req["name"],
            "prompt_tokens": len(req["prompt"]),
            "ttft_s": m.first_token_latency,
            "arrival_wall": m.arrival_time,  # wall clock: profile_hooks attributes timers by it
            "queued_s": m.scheduled_ts - m.queued_ts,
            "prefill_s": m.first_token_ts - m.scheduled_ts,
            "generate_wall_s": wall,
            "cached_tokens": r.num_cached_tokens,
            "token_ids": list(r.outputs[0].token_ids),
            "logprobs": [{str(t): lp.logprob for t, lp in pos.items()} for pos in r.outputs[0].logprobs or []],
            "kvplug": {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)},
        })
    with open(out_path, "w") as f:
        json.dump(out, f)
    # Shut the engine down here, with time to spare (vLLM kills an engine that
    # takes over 5 s by default), so that kvplug finishes its SSD writes and
    # logs its store's statistics ("kvplug: store stats at shutdown").
    llm.llm_engine.engine_core.shutdown(timeout=60)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
