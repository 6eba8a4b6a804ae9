"""StoreCounters: what TieredStore counts, and the stats report built from it.

A Counter of named events (``counters["evictions"] += 1``) plus the per-tier
hit and miss figures of each lookup, in blocks and tokens: the SSD tier is
asked only for what the CPU tier missed. Not thread-safe: the store updates it
under its lock.
"""

from __future__ import annotations

from collections import Counter

from kvplug.blocks import Hit

STORE_KEYS = ("lookups", "lookup_tokens", "hit_tokens", "stored_blocks", "store_skipped_existing",
              "store_no_slot", "evictions", "writes_queued", "writes_done", "writes_failed",
              "writes_dropped", "loads", "load_misses", "promotions", "promotion_failures")


class StoreCounters(Counter):
    def __init__(self, block_tokens: int, ssd: bool):
        super().__init__()
        self.block_tokens, self.ssd = block_tokens, ssd

    def count_lookup(self, num_tokens: int, hit: Hit) -> None:
        blocks = -(-num_tokens // self.block_tokens)
        cpu_blocks = cpu_tokens = 0
        for ref in hit.blocks:
            if ref.tier == "cpu":
                cpu_blocks += 1
                cpu_tokens += ref.num_tokens
        self["lookups"] += 1
        self["lookup_tokens"] += num_tokens
        self["hit_tokens"] += hit.num_tokens
        self["cpu_hit_blocks"] += cpu_blocks
        self["cpu_hit_tokens"] += cpu_tokens
        self["cpu_miss_blocks"] += blocks - cpu_blocks
        self["cpu_miss_tokens"] += num_tokens - cpu_tokens
        if self.ssd:
            self["ssd_hit_blocks"] += len(hit.blocks) - cpu_blocks
            self["ssd_hit_tokens"] += hit.num_tokens - cpu_tokens
            self["ssd_miss_blocks"] += blocks - len(hit.blocks)
            self["ssd_miss_tokens"] += num_tokens - hit.num_tokens

    @staticmethod
    def report(counts: Counter, cpu_stats: dict, ssd_stats: dict | None, *, cpu_blocks: int, block_bytes: int,
               pinned: int, writing: int) -> dict[str, dict[str, int | float]]:
        """Sections "cpu", "store" and (with an SSD tier) "ssd", from a snapshot of the counts."""
        out = {
            "cpu": {**cpu_stats, **_hits(counts, "cpu"), "blocks": cpu_blocks,
                    "bytes": cpu_blocks * block_bytes, "pinned_blocks": pinned},
            "store": {k: counts[k] for k in STORE_KEYS} | {"writes_in_flight": writing},
        }
        if ssd_stats is not None:
            out["ssd"] = {**ssd_stats, **_hits(counts, "ssd")}
        return out


def _hits(counts: Counter, tier: str) -> dict[str, int]:
    return {k: counts[f"{tier}_{k}"] for k in ("hit_blocks", "hit_tokens", "miss_blocks", "miss_tokens")}
