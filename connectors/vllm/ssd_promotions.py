"""SSD promotions a request waits for: their deadline, and what they say about the disk.

A request whose hit has blocks on SSD waits ("ask again", in WAITING_FOR_REMOTE_KVS)
while they are read into CPU slots, until ``LoadPolicy.promotion_deadline``;
then it gives up and recomputes. It gives up sooner on progress: a promotion
that has not landed a single block within ``LoadPolicy.first_landing_budget``
(a twentieth of recomputing) will not beat recomputing on a disk that slow.
Every promotion times the disk for
the policy (whole promotion and first block): one that lands in time, one given
up on (a bound at once, and its real time once it lands), and, for a disk
judged too slow, a background probe of one block now and then that no request
waits for. While the reads of a promotion given up on are still in flight, no
request waits for the SSD (``suspect``): they would queue behind those reads.
"""

from __future__ import annotations

import time

from kvplug.blocks import BlockRef
from kvplug.config import KVPlugConfig
from kvplug.policy import LoadPolicy
from kvplug.store import TieredStore

from .request_state import RequestState
from .stats import KVPlugStats


class SSDPromotions:
    def __init__(self, store: TieredStore, policy: LoadPolicy, stats: KVPlugStats, config: KVPlugConfig,
                 block_bytes: int):
        self.store, self.policy, self.stats, self.config = store, policy, stats, config
        self.block_bytes = block_bytes
        self._late: list = []  # (handle, asked, bytes) of promotions given up on, not landed yet

    def started(self, st: RequestState) -> None:
        """A load was just prepared: count the reads it really issued (a block dropped since
        the lookup ends the hit before it)."""
        st.promoting = sum(b.tier == "ssd" for b in st.handle.blocks)
        st.asked = time.monotonic()
        if st.promoting:
            self.stats.add("promotions")

    def waiting(self, st: RequestState) -> bool:
        """True: its promotion is still within the deadline (ask again). False: it has
        landed (timed), or it is past the deadline (given up: the caller drops the load)."""
        nbytes = st.promoting * self.block_bytes
        handle = st.handle
        if handle.done():
            if st.promoting:  # from the lookup until the last read landed (not until this step asked)
                self._timed(handle, st.asked, nbytes)
                st.promoting = 0
            return False
        tokens, cap, floor = handle.num_tokens_asked, self.config.promotion_timeout_s, self.config.promotion_min_wait_s
        waited = time.monotonic() - st.asked
        landed = bool(handle.first_at)
        deadline = self.policy.promotion_deadline(tokens, {"ssd": nbytes}, cap, floor)
        if not landed:
            deadline = min(deadline, self.policy.first_landing_budget(tokens, cap, floor))
        if waited < deadline:
            return True
        # Recomputing would be faster: give up
        # (the read lands in the CPU tier later, and its real time is measured then); until
        # then the SSD is known to be this slow.
        self.stats.add("promotion_timeouts")
        self.policy.observe_timeout("ssd", nbytes, waited, landed_any=landed)
        self._late.append((handle, st.asked, nbytes))
        st.gave_up = True
        return False

    def _timed(self, handle, asked: float, nbytes: int) -> None:
        self.policy.observe_load("ssd", nbytes, handle.done_at - asked)
        if handle.first_at:
            self.policy.observe_first("ssd", handle.first_at - asked)

    def suspect(self) -> bool:
        """A promotion given up on is still reading: a new one would queue behind it."""
        self.observe_late()
        return bool(self._late)

    def skipped(self, refs: list[BlockRef]) -> None:
        """The policy judged the SSD too slow for this hit: probe it in the background now and then."""
        ssd = [r.key for r in refs if r.tier == "ssd"]
        if ssd and not self._late and self.policy.probe_due("ssd"):  # a probe behind late reads measures the queue
            self.store.probe_ssd(ssd[0], self._probed)

    def _probed(self, ok: bool, seconds: float) -> None:
        if ok:
            self.policy.observe_load("ssd", self.block_bytes, seconds)
            self.policy.observe_first("ssd", seconds)

    def observe_late(self) -> None:
        """Promotions given up on that have landed since: how slow the SSD really was."""
        pending = []
        for handle, asked, nbytes in self._late:
            if handle.done():  # its real speed: a disk that stalled once recovers
                self._timed(handle, asked, nbytes)
            else:
                pending.append((handle, asked, nbytes))
        self._late = pending
