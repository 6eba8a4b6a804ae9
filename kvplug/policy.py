"""LoadPolicy: load a hit only when loading beats recomputing it.

Both sides are measured, never assumed: each tier's bandwidth from the loads
it served, the engine's prefill speed from the steps it ran. Until both are
measured the policy loads (a miss costs a full recompute, a needless load
only a transfer). Estimates are exponentially weighted so they follow the
machine (a busy SSD, a larger batch).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass
class _Rate:
    """Exponentially weighted units per second."""

    alpha: float = 0.2
    value: float | None = None

    def observe(self, units: float, seconds: float) -> None:
        if units <= 0 or seconds <= 0:
            return
        rate = units / seconds
        self.value = rate if self.value is None else (1 - self.alpha) * self.value + self.alpha * rate


class LoadPolicy:
    def __init__(self, mode: str = "always", margin: float = 1.0):
        if mode not in ("always", "auto"):
            raise ValueError(f"load policy {mode!r} is not accepted; expected 'always' or 'auto'")
        self.mode = mode
        self.margin = margin  # load when load_time * margin < recompute_time
        self._tier_bps: dict[str, _Rate] = {}
        self._prefill_tps = _Rate()
        self._lock = threading.Lock()

    def observe_load(self, tier: str, nbytes: int, seconds: float) -> None:
        with self._lock:
            self._tier_bps.setdefault(tier, _Rate()).observe(nbytes, seconds)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        with self._lock:
            self._prefill_tps.observe(tokens, seconds)

    def load_seconds(self, bytes_by_tier: dict[str, int]) -> float | None:
        """Estimated time to bring these bytes in, or None while a tier is unmeasured."""
        total = 0.0
        with self._lock:
            for tier, nbytes in bytes_by_tier.items():
                if nbytes <= 0:
                    continue
                rate = self._tier_bps.get(tier)
                if rate is None or rate.value is None:
                    return None
                total += nbytes / rate.value
        return total

    def recompute_seconds(self, tokens: int) -> float | None:
        with self._lock:
            tps = self._prefill_tps.value
        return None if tps is None else tokens / tps

    def should_load(self, tokens: int, bytes_by_tier: dict[str, int]) -> bool:
        if self.mode == "always" or tokens <= 0:
            return tokens > 0
        load, recompute = self.load_seconds(bytes_by_tier), self.recompute_seconds(tokens)
        if load is None or recompute is None:
            return True
        return load * self.margin < recompute

    def promotion_deadline(self, tokens: int, cap_s: float) -> float:
        """Seconds a request may wait for a promotion of ``tokens``: until recomputing them
        would have been faster (once prefill speed is measured), at most ``cap_s``."""
        recompute = self.recompute_seconds(tokens)
        return cap_s if recompute is None else min(cap_s, recompute)

    def snapshot(self) -> dict[str, float | None]:
        with self._lock:
            out = {f"{tier}_load_gbps": (r.value or 0) / 1e9 for tier, r in self._tier_bps.items()}
            out["prefill_tokens_per_s"] = self._prefill_tps.value
        return out
