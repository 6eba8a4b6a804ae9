"""kvplug's counters in vLLM's connector-stats pipeline.

Both halves count into a ``KVPlugStats`` (a flat dict of numbers). vLLM sends
the worker's to the front end with each step's output and merges the
scheduler's in; the front end sums them (``aggregate``), logs them every
interval ("KV Transfer metrics: ...") and feeds Prometheus counters
(``vllm:kvplug_<name>``).
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

# name -> help text; every counter is a running total, reported as deltas.
COUNTERS = {
    "lookups": "Prompts looked up in kvplug",
    "lookup_tokens": "Prompt tokens looked up (beyond vLLM's own prefix cache)",
    "hit_tokens": "Prompt tokens loaded from kvplug instead of recomputed",
    "hit_tokens_cpu": "Hit tokens whose block was in the CPU tier at lookup",
    "hit_tokens_ssd": "Hit tokens whose block was promoted from the SSD tier",
    "promotions": "Lookups that waited for SSD blocks to be promoted to CPU",
    "policy_skipped_tokens": "Hit tokens recomputed because load_policy=auto judged loading them slower",
    "promotion_timeouts": "Requests that stopped waiting for an SSD promotion and recomputed (slow disk)",
    "promotion_failed_blocks": "SSD blocks that could not be read during promotion (treated as a miss)",
    "remote_fetches": "Lookups that asked the remote tier for blocks the local tiers lack (in the background)",
    "remote_fetched_blocks": "Blocks fetched from the remote tier, verified, into the CPU tier for a lookup",
    "remote_timeouts": "Requests that stopped waiting for a remote fetch and recomputed (slow or unreachable server)",
    "remote_busy": "Lookups that did not ask the remote tier: too many fetches already in flight",
    "loaded_blocks": "Blocks copied from kvplug into vLLM's KV cache",
    "load_failed_blocks": "Blocks whose load failed in the worker (vLLM recomputes them)",
    "stored_blocks": "Blocks written into kvplug (new keys only)",
    "store_skipped_blocks": "Blocks not written: already stored, in flight, or no room",
    "aborted_blocks": "Stores abandoned: not written by the worker, or computed over a failed load",
    "skipped_requests": "Requests kvplug neither stores nor loads: their KV is not determined by what it can key",
    "skipped_prompt_embeds": "Requests skipped because they carry prompt embeddings",
    "skipped_multimodal": "Requests skipped because they carry multimodal inputs",
    "skipped_lora_unreadable": "Requests skipped because their LoRA adapter's files cannot be read here",
    "resets": "Cache resets (reset_prefix_cache): a new epoch each, nothing stored before is loaded after",
    "slab_unpinned": "Workers whose CPU slab could not be page-locked (GPU transfers fall back to the host transport)",
    "load_bytes": "Bytes decoded from kvplug slots into vLLM's KV cache",
    "save_bytes": "Bytes encoded from vLLM's KV cache into kvplug slots",
    "ssd_read_bytes": "Block bytes promoted from the SSD tier (verified reads)",
    "ssd_write_bytes": "Block bytes written to the SSD tier (write-through or write-back)",
    "remote_read_bytes": "Record bytes fetched from the remote tier (verified records)",
    "remote_write_bytes": "Record bytes written to the remote tier",
}


class KVPlugStats(KVConnectorStats):
    def reset(self) -> None:
        self.data = {}

    def add(self, name: str, value: int | float = 1) -> None:
        if value:
            self.data[name] = self.data.get(name, 0) + value

    def aggregate(self, other: KVConnectorStats) -> "KVPlugStats":
        for name, value in other.data.items():
            self.add(name, value)
        return self

    def reduce(self) -> dict[str, int | float]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in sorted(self.data.items())}

    def is_empty(self) -> bool:
        return not any(self.data.values())

    def take(self) -> "KVPlugStats | None":
        """This interval's counts (None when nothing happened), and a fresh start."""
        if self.is_empty():
            return None
        out = KVPlugStats(data=self.data)
        self.data = {}
        return out


class TierBytes:
    """Bytes each backing tier moved since the last step, counted into the scheduler's stats
    (the tiers move them on their own threads; their running totals are read once a step)."""

    def __init__(self, store):
        self._tiers = [(name, tier) for name, tier in (("ssd", store.ssd), ("remote", store.remote))
                       if tier is not None]
        self._seen = {name: (0, 0) for name, _ in self._tiers}

    def count(self, stats: KVPlugStats) -> None:
        for name, tier in self._tiers:
            read, written = tier.bytes_moved()
            seen_read, seen_written = self._seen[name]
            stats.add(f"{name}_read_bytes", read - seen_read)
            stats.add(f"{name}_write_bytes", written - seen_written)
            self._seen[name] = (read, written)


class KVPlugPromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {}
        for name, doc in COUNTERS.items():
            counter = self._counter_cls(name=f"vllm:kvplug_{name}", documentation=doc, labelnames=labelnames)
            for engine, values in per_engine_labelvalues.items():
                self._counters[(engine, name)] = counter.labels(*values)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, value in transfer_stats_data.items():
            counter = self._counters.get((engine_idx, name))
            if counter is not None and value > 0:
                counter.inc(value)
