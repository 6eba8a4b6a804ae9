"""What an engine's log says: vLLM's CPU thread layout, kvplug's warnings and errors."""

from __future__ import annotations


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
