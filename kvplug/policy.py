"""LoadPolicy: load a hit only when loading beats recomputing it.

Both sides are measured, never assumed: each tier's bandwidth from the loads
it served, the engine's prefill speed from the steps it ran. Until both are
measured the policy loads (a miss costs a full recompute, a needless load
only a transfer). Estimates are exponentially weighted so they follow the
machine (a busy SSD, a larger batch).

Slow tiers (SSD, remote) are always checked, whatever the mode: "always" loads
every CPU hit, but a promotion measured to be slower than recomputing is
skipped. A promotion that outlived its deadline bounds its tier's speed at
once (``observe_timeout``), so the next request recomputes without waiting.
A tier judged too slow is probed again once every ``PROBE_S`` (``probe_due``:
the caller reads one block in the background, no request waits for it), so a
disk that recovers is seen to.

A promotion is given up on progress, not only on its deadline: one that has
not landed a single block within ``first_landing_budget`` (a twentieth of
recomputing, at least the scheduling floor) is abandoned at once, so a disk
that turns 100x slower costs the first request about 5% over recomputing, not
the whole deadline. The time a promotion's first block took is tracked per
tier; a tier whose first block is slower than that budget is not waited on.
A measurement at least ``SURPRISE`` times off the estimate replaces it (the
disk changed), instead of being averaged in over many requests.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

SLOW_TIERS = ("ssd", "remote")  # promotions: checked against recomputing in every mode
PROBE_S = 10.0                   # a tier judged too slow still gets one promotion this often
FIRST_SHARE = 0.05               # a promotion with no block landed after this share of recomputing: give up
SURPRISE = 4.0                   # a measurement this many times off the estimate replaces it


@dataclass
class _Rate:
    """Exponentially weighted units per second."""

    alpha: float = 0.2
    value: float | None = None
    follow: bool = False  # a measurement SURPRISE times off replaces the estimate (a disk that changed)

    def observe(self, units: float, seconds: float) -> None:
        if units <= 0 or seconds <= 0:
            return
        rate = units / seconds
        if self.value is None or self.follow and not self.value / SURPRISE < rate < self.value * SURPRISE:
            self.value = rate  # first, or the machine changed: follow at once
        else:
            self.value = (1 - self.alpha) * self.value + self.alpha * rate


class LoadPolicy:
    def __init__(self, mode: str = "always", margin: float = 1.0):
        if mode not in ("always", "auto"):
            raise ValueError(f"load policy {mode!r} is not accepted; expected 'always' or 'auto'")
        self.mode = mode
        self.margin = margin  # load when load_time * margin < recompute_time
        self._tier_bps: dict[str, _Rate] = {}
        self._prefill_tps = _Rate()
        self._first: dict[str, _Rate] = {}   # tier -> promotions per second until the first block lands
        self._seen: dict[str, float] = {}  # tier -> when its speed was last observed
        self._stalled: dict[str, float] = {}  # tier -> seconds a promotion waited and landed nothing
        self._lock = threading.Lock()

    def observe_load(self, tier: str, nbytes: int, seconds: float) -> None:
        with self._lock:
            self._tier_bps.setdefault(tier, _Rate(follow=True)).observe(nbytes, seconds)
            self._seen[tier] = time.monotonic()

    def observe_first(self, tier: str, seconds: float) -> None:
        """A promotion (or a probe) of ``tier`` landed its first block after ``seconds``."""
        with self._lock:
            self._first.setdefault(tier, _Rate(follow=True)).observe(1.0, seconds)
            self._seen[tier] = time.monotonic()
            if seconds < self._stalled.get(tier, 0.0):  # landed sooner than a stalled one waited
                del self._stalled[tier]

    def observe_timeout(self, tier: str, nbytes: int, seconds: float, landed_any: bool = True) -> None:
        """A promotion of ``nbytes`` had not finished after ``seconds`` (nor landed a single block,
        with ``landed_any`` False): the tier is no faster than that, now (a bound, not averaged in:
        the next request must not wait for it too)."""
        if nbytes <= 0 or seconds <= 0:
            return
        with self._lock:
            rate = self._tier_bps.setdefault(tier, _Rate(follow=True))
            rate.value = min(rate.value if rate.value is not None else float("inf"), nbytes / seconds)
            if not landed_any:
                self._stalled[tier] = seconds
                first = self._first.setdefault(tier, _Rate(follow=True))
                first.value = min(first.value if first.value is not None else float("inf"), 1.0 / seconds)
            self._seen[tier] = time.monotonic()

    def first_seconds(self, tier: str) -> float | None:
        """Expected time until a promotion of ``tier`` lands its first block (None: unmeasured)."""
        with self._lock:
            first = self._first.get(tier)
            return None if first is None or not first.value else 1.0 / first.value

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

    def should_load(self, tokens: int, bytes_by_tier: dict[str, int], floor_s: float = 0.0) -> bool:
        """``floor_s``: the promotion floor (``first_landing_budget``)."""
        if tokens <= 0:
            return False
        slow = [t for t in SLOW_TIERS if bytes_by_tier.get(t, 0) > 0]
        if self.mode == "always" and not slow:
            return True
        checked = bytes_by_tier if self.mode == "auto" else {t: bytes_by_tier[t] for t in slow}
        load, recompute = self.load_seconds(checked), self.recompute_seconds(tokens)
        budget = None if recompute is None else self.first_landing_budget(tokens, float("inf"), floor_s)
        if budget is not None and any(t in self._stalled and (f := self.first_seconds(t)) is not None
                                      and f >= budget for t in slow):
            return False  # a promotion of it stalled, its first block would come too late: given up again
        return load is None or recompute is None or load * self.margin < recompute

    def probe_due(self, tier: str) -> bool:
        """True (once) when ``tier`` has not been measured for ``PROBE_S``: the caller reads one
        of its blocks in the background and reports the time (``observe_load``)."""
        now = time.monotonic()
        with self._lock:
            if now - self._seen.get(tier, now) < PROBE_S:
                return False
            self._seen[tier] = now  # one probe at a time
        return True

    def promotion_deadline(self, tokens: int, promoted: dict[str, int], cap_s: float, floor_s: float = 0.0) -> float:
        """Seconds a request may wait for the promotion of ``promoted`` bytes (by tier) before it
        recomputes its ``tokens`` instead. A request that gives up pays the wait on top of the
        recompute, so the wait is kept to what the promotion should take:

        - prefill speed not measured yet: ``cap_s``;
        - tier speed not measured yet (a first promotion): until recomputing would have been
          faster, at most ``cap_s``;
        - otherwise twice the time the tier's measured speed predicts, but at least a tenth of
          recomputing (so a disk that turns 100x slower costs at most ~10% over recomputing)
          and never more than recomputing.
        Never under the floor (``floor_s``, scheduling jitter, but at most a tenth of recomputing),
        never over ``cap_s``."""
        recompute = self.recompute_seconds(tokens)
        if recompute is None:
            return cap_s
        load = self.load_seconds(promoted)
        wait = recompute if load is None else min(recompute, max(recompute / 10, 2 * load))
        return min(cap_s, max(min(floor_s, recompute / 10), wait))

    def first_landing_budget(self, tokens: int, cap_s: float, floor_s: float = 0.0) -> float:
        """Seconds a promotion may go without landing a single block before it is given up:
        ``FIRST_SHARE`` of recomputing ``tokens`` (``cap_s`` while unmeasured), never under the
        floor (``floor_s``, at most a tenth of recomputing)."""
        recompute = self.recompute_seconds(tokens)
        if recompute is None:
            return cap_s
        return min(cap_s, max(min(floor_s, recompute / 10), FIRST_SHARE * recompute))

    def snapshot(self) -> dict[str, float | None]:
        with self._lock:
            out = {f"{tier}_load_gbps": (r.value or 0) / 1e9 for tier, r in self._tier_bps.items()}
            out["prefill_tokens_per_s"] = self._prefill_tps.value
        return out
