"""One vLLM engine, driven by the soak bench over a local socket.

    python runner.py ADDRESS AUTHKEY_HEX SPEC.json

bench/soak/engines.py starts each engine in its own process with this script (vLLM
starts its EngineCore in a spawned subprocess and is happiest owning its
process; its log goes to this process's stdout/stderr, which the bench sends
to a file). SPEC: {"model": DIR, "kvplug": null | {kv_connector_extra_config},
"max_model_len": int, "prefix_caching": bool (vLLM's own; default off)}. The engine answers, one at a time:

    {"cmd": "generate", "prompts": [[ids], ...], "max_tokens": n, "logprobs": k}
        one generate() call (one batch): per prompt, greedy tokens, top-k logprobs,
        vLLM's cached-token count (kvplug's hit: vLLM's prefix cache is off),
        TTFT (RequestOutput.metrics.first_token_latency), finish reason; an
        exception fails every prompt of the call
    {"cmd": "metrics"}    kvplug's counters (vllm:kvplug_*) and vLLM's preemptions
    {"cmd": "drain", "settle_s": s}   let the steps after generate() run (tails, write-backs)
    {"cmd": "reset_prefix_cache"}     empty vLLM's own prefix cache (SPEC "prefix_caching": true)
    {"cmd": "shutdown"}   shut the engine down with time to spare, then exit
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from multiprocessing.connection import Client


def counters(llm) -> dict[str, float]:
    out = {}
    for m in llm.get_metrics():
        if "kvplug_" in m.name:
            out[m.name.split("kvplug_", 1)[1]] = m.value
        elif m.name == "vllm:num_preemptions":
            out["vllm_preemptions"] = m.value
    return out


def main(address: str, authkey_hex: str, spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    conn = Client(address, authkey=bytes.fromhex(authkey_hex))
    try:
        from vllm import LLM, SamplingParams, TokensPrompt

        from kvplug.tools.offline_llm import drain

        kwargs = {}
        if spec.get("kvplug") is not None:
            kwargs["kv_transfer_config"] = {
                "kv_connector": "kvplug", "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                "kv_connector_extra_config": spec["kvplug"],
            }
        t0 = time.monotonic()
        llm = LLM(model=spec["model"], enforce_eager=True, max_model_len=spec["max_model_len"],
                  enable_prefix_caching=spec.get("prefix_caching", False), disable_log_stats=False, seed=0,
                  **kwargs)
        conn.send({"ready": True, "engine_start_s": time.monotonic() - t0})
    except BaseException:
        conn.send({"ready": False, "error": traceback.format_exc()})
        raise
    while True:
        cmd = conn.recv()
        kind = cmd["cmd"]
        if kind == "generate":
            params = SamplingParams(max_tokens=cmd.get("max_tokens", 8), temperature=0.0,
                                    logprobs=cmd.get("logprobs", 5))
            t = time.perf_counter()
            try:
                outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in cmd["prompts"]], params,
                                    use_tqdm=False)
                results = [{
                    "request_id": r.request_id,
                    "token_ids": list(r.outputs[0].token_ids),
                    "logprobs": [{str(k): v.logprob for k, v in pos.items()} for pos in r.outputs[0].logprobs or []],
                    "cached_tokens": r.num_cached_tokens or 0,
                    "ttft_s": r.metrics.first_token_latency if r.metrics is not None else None,
                    # engine-core monotonic timestamps: queued -> scheduled -> first -> last token
                    "ts": [r.metrics.queued_ts, r.metrics.scheduled_ts, r.metrics.first_token_ts,
                           r.metrics.last_token_ts] if r.metrics is not None else None,
                    "finish_reason": r.outputs[0].finish_reason,
                } for r in outs]
                conn.send({"results": results, "wall_s": time.perf_counter() - t})
            except Exception:  # noqa: BLE001 - a failed call is a result: every request in it failed
                conn.send({"error": traceback.format_exc(), "wall_s": time.perf_counter() - t})
        elif kind == "metrics":
            conn.send({"counters": counters(llm)})
        elif kind == "reset_prefix_cache":
            conn.send({"ok": bool(llm.reset_prefix_cache())})
        elif kind == "drain":
            drain(llm, cmd.get("settle_s", 0.5))
            conn.send({"ok": True})
        elif kind == "shutdown":
            # With time to spare (vLLM kills an engine that takes over 5 s by default), so that
            # kvplug finishes its SSD writes and logs "kvplug: store stats at shutdown".
            llm.llm_engine.engine_core.shutdown(timeout=60)
            conn.send({"ok": True})
            conn.close()
            return
        else:
            conn.send({"error": f"unknown command {kind!r}"})


if __name__ == "__main__":
    main(*sys.argv[1:4])
