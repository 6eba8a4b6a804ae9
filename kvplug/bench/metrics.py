"""What a vLLM server's /metrics says: counters summed over labels, and kvplug's in plain words."""

from __future__ import annotations

import urllib.request

KVPLUG = "vllm:kvplug_"


def parse(text: str) -> dict[str, float]:
    """{sample name: value summed over label sets} (counters keep their ``_total`` suffix)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + float(s.value)
    return out


def scrape(url: str, timeout: float = 10) -> dict[str, float]:
    """``url``: a server's base URL or its /metrics URL."""
    if not url.rstrip("/").endswith("/metrics"):
        url = url.rstrip("/") + "/metrics"
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return parse(r.read().decode())


def kvplug_counters(samples: dict[str, float]) -> dict[str, float]:
    """kvplug's counters by their short name (``hit_tokens``, ``hit_tokens_cpu``, ...)."""
    return {name[len(KVPLUG):].removesuffix("_total"): v for name, v in samples.items()
            if name.startswith(KVPLUG) and name.endswith("_total")}


def vllm_counters(samples: dict[str, float]) -> dict[str, float]:
    """vLLM's own figures a bench compares: prompt tokens, its prefix cache, preemptions."""
    names = {"prompt_tokens": "vllm:prompt_tokens_total", "generation_tokens": "vllm:generation_tokens_total",
             "prefix_cache_queries": "vllm:prefix_cache_queries_total",
             "prefix_cache_hits": "vllm:prefix_cache_hits_total", "preemptions": "vllm:num_preemptions_total",
             "external_prefix_cache_queries": "vllm:external_prefix_cache_queries_total",
             "external_prefix_cache_hits": "vllm:external_prefix_cache_hits_total",
             "requests_success": "vllm:request_success_total"}
    # where a request's time went, summed over requests (vLLM's histograms): waiting for a slot in the
    # running batch (queue), computing its prompt (prefill: kvplug's loads included), generating
    for phase in ("queue", "prefill", "decode"):
        names[f"{phase}_time_s_sum"] = f"vllm:request_{phase}_time_seconds_sum"
    return {k: samples[v] for k, v in names.items() if v in samples}


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def summary(kv: dict[str, float]) -> dict[str, float]:
    """Hit rates per tier, bytes loaded into and saved from vLLM's KV cache (through the CPU tier),
    and bytes each backing tier read and wrote, from kvplug's counters."""
    looked = kv.get("lookup_tokens", 0.0)
    hit = kv.get("hit_tokens", 0.0)
    return {"lookup_tokens": looked, "hit_tokens": hit,
            "hit_tokens_cpu": kv.get("hit_tokens_cpu", 0.0), "hit_tokens_ssd": kv.get("hit_tokens_ssd", 0.0),
            "hit_rate": hit / looked if looked else 0.0,
            "hit_rate_cpu": kv.get("hit_tokens_cpu", 0.0) / looked if looked else 0.0,
            "hit_rate_ssd": kv.get("hit_tokens_ssd", 0.0) / looked if looked else 0.0,
            "load_bytes": kv.get("load_bytes", 0.0), "save_bytes": kv.get("save_bytes", 0.0),
            **{f"{tier}_{way}_bytes": kv.get(f"{tier}_{way}_bytes", 0.0)
               for tier in ("ssd", "remote") for way in ("read", "write")},
            "stored_blocks": kv.get("stored_blocks", 0.0), "loaded_blocks": kv.get("loaded_blocks", 0.0),
            "errors": sum(kv.get(k, 0.0) for k in ("load_failed_blocks", "promotion_failed_blocks",
                                                    "promotion_timeouts"))}
