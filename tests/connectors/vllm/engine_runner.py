"""Run one vLLM engine through a list of steps and write what came out as JSON.

    python engine_runner.py SPEC.json OUT.json

The e2e tests start each engine in its own process with this script (vLLM
starts its engine in subprocesses and is happiest owning its process). SPEC:

    {"model": DIR, "kvplug": null | {kv_connector_extra_config},
     "load_failure_policy": "recompute" | "fail" | null,  # kv_load_failure_policy; null: not set,
                              # vLLM's default applies; absent: "recompute"
     "kv_events_port": int,   # optional: publish KV cache events there and record them per step
     "enable_lora": bool, "max_lora_rank": int,           # optional: serve LoRA adapters
     "speculative_config": {...},                         # optional: vLLM's speculative_config
     "steps": [{"name": str, "prompts": [[token ids], ...], "max_tokens": int,
                "fail_second_block": bool,  # optional: the worker cannot read the
                                            # second block of any load
                "lora": null | {"name": str, "id": int, "path": DIR},  # optional: every prompt's adapter
                "cache_salt": str,          # optional: every prompt's cache salt
               }
               | {"name": str, "reset_prefix_cache": true | {kwargs}}, ...]}

A prompt is a list of token ids, or {"concat": [part, ...]} whose parts are
lists of token ids or {"prompt_of": STEP} / {"output_of": STEP, "first": n}:
the prompt or the generated tokens (the first n of them) of an earlier step's
first prompt, so that a later request can continue an earlier one.

A step's prompts go in one generate call (one batch). OUT has, per step, each
prompt's generated token ids, its top-5 logprobs at every position, how many
prompt tokens vLLM reported cached (kvplug's hit, with vLLM's prefix cache
off), its finish reason, and the change of every kvplug counter (and of vLLM's
preemption and speculative-decoding counters) over the step.

A ``reset_prefix_cache`` step generates nothing: it calls
``LLM.reset_prefix_cache(**kwargs)`` (``true``: ``reset_connector=True``, which
makes vLLM's scheduler call the connector's ``reset_cache()``) and records what
it returned as ``"reset"``.

``fail_second_block``: vLLM's worker process imports this script again
(multiprocessing spawn), which patches the worker half there; a file whose
path is in the environment switches the fault on.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import torch

from kvplug.tools.offline_llm import drain


def _install_fault_injection(flag_path: str) -> None:
    from kvplug.codec import Codec
    from kvplug.connectors.vllm.worker import WorkerHalf

    start_load, decode = WorkerHalf.start_load, Codec.decode
    bad: set[int] = set()

    def start_load_marking(self, meta):
        bad.clear()
        if os.path.exists(flag_path):
            bad.update(job.block_ids[1] for job in meta.loads if len(job.block_ids) > 1)
        return start_load(self, meta)

    def failing_decode(self, src, kv_view, block_ids):
        hit = bad.intersection(torch.as_tensor(block_ids).tolist())
        if hit:
            raise OSError(f"injected read error (blocks {sorted(hit)})")
        return decode(self, src, kv_view, block_ids)

    WorkerHalf.start_load, Codec.decode = start_load_marking, failing_decode


FAULT_FLAG = "E2E_FAULT_FLAG"  # not KVPLUG_*: those are kvplug settings
if os.environ.get(FAULT_FLAG):  # in vLLM's spawned processes
    _install_fault_injection(os.environ[FAULT_FLAG])


def _counters(llm) -> dict[str, float]:
    """kvplug's counters, vLLM's preemption count and its speculative-decoding counters."""
    out = {}
    for m in llm.get_metrics():
        if "kvplug_" in m.name:
            out[m.name.split("kvplug_", 1)[1]] = m.value
        elif m.name == "vllm:num_preemptions":
            out["vllm_preemptions"] = m.value
        elif m.name.startswith("vllm:spec_decode_") and hasattr(m, "value"):
            out[m.name.split(":", 1)[1]] = m.value
    return out


class _KVEvents:
    """Subscribes to the engine's KV cache events (ZMQ) and keeps the ones it hears."""

    def __init__(self, port: int):
        import threading

        import msgspec
        import zmq
        from vllm.distributed.kv_events import KVEventBatch

        self.events: list[dict] = []
        self._sock = zmq.Context.instance().socket(zmq.SUB)
        self._sock.connect(f"tcp://127.0.0.1:{port}")
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._decode = msgspec.msgpack.Decoder(type=KVEventBatch).decode
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._sock.poll(50):
                *_, payload = self._sock.recv_multipart()
                for ev in self._decode(payload).events:
                    kind = type(ev).__name__
                    self.events.append({"type": kind, "medium": getattr(ev, "medium", None),
                                        "hashes": len(getattr(ev, "block_hashes", []) or []),
                                        "token_ids": list(getattr(ev, "token_ids", []) or [])})

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _prompt(p, done: dict[str, dict]) -> list[int]:
    if isinstance(p, list):
        return p
    ids: list[int] = []
    for part in p["concat"]:
        if isinstance(part, list):
            ids += part
        elif "prompt_of" in part:
            ids += done[part["prompt_of"]]["prompts"][0]
        else:
            ids += done[part["output_of"]]["outputs"][0]["token_ids"][:part.get("first")]
    return ids


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    flag = os.environ[FAULT_FLAG] = os.path.join(tempfile.mkdtemp(prefix="kvplug-fault-"), "fail_second_block")
    _install_fault_injection(flag)  # in case vLLM forks instead

    from vllm import LLM, SamplingParams, TokensPrompt
    from vllm.lora.request import LoRARequest

    kwargs = {}
    if spec.get("kvplug") is not None:
        kwargs["kv_transfer_config"] = {
            "kv_connector": "kvplug", "kv_role": "kv_both", "kv_connector_extra_config": spec["kvplug"],
        }
        policy = spec.get("load_failure_policy", "recompute")
        if policy is not None:
            kwargs["kv_transfer_config"]["kv_load_failure_policy"] = policy
    if spec.get("enable_lora"):
        kwargs.update(enable_lora=True, max_lora_rank=spec.get("max_lora_rank", 8))
    if spec.get("speculative_config"):
        kwargs["speculative_config"] = spec["speculative_config"]
    if spec.get("max_num_batched_tokens"):  # a small step budget: chunked prefill
        kwargs["max_num_batched_tokens"] = spec["max_num_batched_tokens"]
    if spec.get("num_kv_blocks"):  # a small KV cache, so that vLLM preempts requests
        kwargs["num_gpu_blocks_override"] = spec["num_kv_blocks"]
    tp = spec.get("tensor_parallel_size", 1)
    if tp > 1:
        kwargs.update(tensor_parallel_size=tp, distributed_executor_backend="mp")
    if spec.get("kv_events_port"):
        kwargs["kv_events_config"] = {"enable_kv_cache_events": True, "publisher": "zmq",
                                      "endpoint": f"tcp://*:{spec['kv_events_port']}"}
    t0 = time.monotonic()
    llm = LLM(model=spec["model"], enforce_eager=True, max_model_len=spec.get("max_model_len", 2048),
              enable_prefix_caching=spec.get("enable_prefix_caching", False), disable_log_stats=False,
              seed=0, **kwargs)
    out = {"engine_start_s": time.monotonic() - t0, "steps": {}}
    listener = _KVEvents(spec["kv_events_port"]) if spec.get("kv_events_port") else None
    step_start = 0
    for step in spec["steps"]:
        if step.get("reset_prefix_cache"):
            before = _counters(llm)
            args = step["reset_prefix_cache"]
            reset = llm.reset_prefix_cache(**(args if isinstance(args, dict) else {"reset_connector": True}))
            drain(llm)
            after = _counters(llm)
            out["steps"][step["name"]] = {"reset": reset,
                                          "counters": {k: after[k] - before.get(k, 0) for k in after}}
            continue
        if step.get("fail_second_block"):
            open(flag, "w").close()
        before = _counters(llm)
        t = time.monotonic()
        params = SamplingParams(max_tokens=step.get("max_tokens", 8), temperature=0.0, logprobs=5)
        prompt_ids = [_prompt(p, out["steps"]) for p in step["prompts"]]
        prompts = [TokensPrompt(prompt_token_ids=p) for p in prompt_ids]
        if step.get("cache_salt") is not None:
            for p in prompts:
                p["cache_salt"] = step["cache_salt"]
        lora = step.get("lora")
        lora_request = LoRARequest(lora["name"], lora["id"], lora["path"]) if lora else None
        results = llm.generate(prompts, params, lora_request=lora_request, use_tqdm=False)
        elapsed = time.monotonic() - t
        drain(llm)
        if listener:
            time.sleep(0.3)  # the events of the step's last outputs are on their way
        if os.path.exists(flag):
            os.unlink(flag)
        after = _counters(llm)
        out["steps"][step["name"]] = {
            "seconds": elapsed,
            "prompts": prompt_ids,
            "outputs": [{
                "token_ids": list(r.outputs[0].token_ids),
                "logprobs": [{str(k): v.logprob for k, v in pos.items()} for pos in r.outputs[0].logprobs or []],
                "cached_tokens": r.num_cached_tokens,
                "finish_reason": r.outputs[0].finish_reason,
                "ttft": r.metrics.first_token_latency if r.metrics is not None else None,
            } for r in results],
            "counters": {k: after[k] - before.get(k, 0) for k in after},
        }
        if listener:
            out["steps"][step["name"]]["kv_events"] = listener.events[step_start:]
            step_start = len(listener.events)
    if listener:
        listener.close()
    with open(out_path, "w") as f:
        json.dump(out, f)
    if spec.get("linger_s"):  # let SSD write-backs finish before vLLM tears the engine down
        time.sleep(spec["linger_s"])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
