"""SSD promotions a request waits for: their deadline, and what they say about the disk.

A request whose hit has blocks on SSD waits ("ask again", in WAITING_FOR_REMOTE_KVS)
while they are read into CPU slots, until ``LoadPolicy.promotion_deadline``;
then it gives up and recomputes. Every promotion times the disk for the
policy: one that lands in time, one given up on (a bound at once, and its real
time once it lands), and, for a disk judged too slow, a background probe of one
block now and then that no request waits for.
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
        if st.handle.done():
            if st.promoting:  # from the lookup until the last read landed (not until this step asked)
                self.policy.observe_load("ssd", nbytes, st.handle.done_at - st.asked)
                st.promoting = 0
            return False
        waited = time.monotonic() - st.asked
        if waited < self.policy.promotion_deadline(st.handle.num_tokens_asked, {"ssd": nbytes},
                                                   self.config.promotion_timeout_s, self.config.promotion_min_wait_s):
            return True
        # Recomputing would have been faster: give up (the read lands in the CPU tier later,
        # and its real time is measured then); until then the SSD is known to be this slow.
        self.stats.add("promotion_timeouts")
        self.policy.observe_timeout("ssd", nbytes, waited)
        self._late.append((st.handle, st.asked, nbytes))
        st.gave_up = True
        return False

    def skipped(self, refs: list[BlockRef]) -> None:
        """The policy judged the SSD too slow for this hit: probe it in the background now and then."""
        ssd = [r.key for r in refs if r.tier == "ssd"]
        if ssd and self.policy.probe_due("ssd"):
            self.store.probe_ssd(ssd[0], self._probed)

    def _probed(self, ok: bool, seconds: float) -> None:
        if ok:
            self.policy.observe_load("ssd", self.block_bytes, seconds)

    def observe_late(self) -> None:
        """Promotions given up on that have landed since: how slow the SSD really was."""
        pending = []
        for handle, asked, nbytes in self._late:
            if handle.done():  # its real speed, averaged in: a disk that stalled once recovers
                self.policy.observe_load("ssd", nbytes, handle.done_at - asked)
            else:
                pending.append((handle, asked, nbytes))
        self._late = pending
