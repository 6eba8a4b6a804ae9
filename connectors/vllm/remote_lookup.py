"""Remote lookups for the scheduler half: fetch in the background, ask again next step.

vLLM's scheduler thread never waits on the network. The first time a
request's local hit (CPU + SSD tiers) stops short of the blocks its prompt
could hit, the full blocks past it (at most ``remote_fetch_blocks``, and only
when they could add ``min_hit_tokens``) are fetched from the remote tier in one
pipelined round trip on a reader thread (kvplug/store_remote.py), and
``get_num_new_matched_tokens`` answers None: "ask again", others run
meanwhile. The fetched blocks, verified, land in the CPU tier; the next
lookup finds them there and they load as CPU hits. A fetch that outlives the
promotion deadline (a slow or unreachable server) is given up (cancelled if
still queued; what it brings back later is not stored): the request goes on
with its local hit and recomputes the rest, and the policy learns how slow
the server was. A request waits for the remote at most once, and not at all
when the store has too many fetches in flight.

Full blocks only: a partial tail is found through the local index, which the
remote tier does not have (its keys are looked up, never listed).
"""

from __future__ import annotations

import time

from kvplug.blocks import Hit
from kvplug.config import KVPlugConfig
from kvplug.policy import LoadPolicy
from kvplug.store import TieredStore

from .request_state import RequestState
from .stats import KVPlugStats


class RemoteLookups:
    def __init__(self, store: TieredStore, policy: LoadPolicy, stats: KVPlugStats, config: KVPlugConfig,
                 block_tokens: int, block_bytes: int):
        self.store, self.policy, self.stats, self.config = store, policy, stats, config
        self.T, self.block_bytes = block_tokens, block_bytes
        self._probes: list = []  # fetches timing a server judged too slow (no request waits for them)

    def _observe_probes(self) -> None:
        for fetch in [f for f in self._probes if f.done()]:
            self._probes.remove(fetch)
            if fetch.landed:
                self.policy.observe_load("remote", fetch.landed * self.block_bytes, fetch.done_at - fetch.asked)

    def wait(self, st: RequestState, hit: Hit, num_computed_tokens: int, cap: int) -> bool | None:
        """None: a fetch is in flight (answer "ask again"); True: one landed since this
        request's last lookup (look up again); False: go on with the local hit."""
        self._observe_probes()
        fetch = st.remote
        if fetch is None:
            return None if self._start(st, hit, num_computed_tokens, cap) else False
        if fetch.done():
            st.remote = None
            if fetch.landed:
                self.policy.observe_load("remote", fetch.landed * self.block_bytes, fetch.done_at - fetch.asked)
            self.stats.add("remote_fetched_blocks", fetch.landed)
            return fetch.found > 0
        waited = time.monotonic() - fetch.asked
        tokens = fetch.blocks * self.T
        if waited < self.policy.promotion_deadline(tokens, {"remote": fetch.blocks * self.block_bytes},
                                                   self.config.promotion_timeout_s, self.config.promotion_min_wait_s):
            return None
        # Recomputing would have been faster: the server is no faster than this, for now.
        st.remote = None
        fetch.abandon()  # not sent if still queued; lands nothing if it comes back
        self.stats.add("remote_timeouts")
        self.policy.observe_timeout("remote", fetch.blocks * self.block_bytes, waited)
        return False

    def _start(self, st: RequestState, hit: Hit, num_computed_tokens: int, cap: int) -> bool:
        if st.remote_tried or not self.store.remote.available():
            return False
        # Full blocks past the local hit, up to the one holding the last prompt token (its key needs
        # all its tokens; the lookup then takes the hit up to, not including, that token), at most
        # remote_fetch_blocks of them. Worth asking only if they could add min_hit_tokens to the hit.
        have = max(hit.num_tokens, num_computed_tokens)
        first = have // self.T
        last = min((cap + 1) // self.T, first + self.store.remote_fetch_blocks)
        if last <= first or min(last * self.T, cap) - have < self.config.min_hit_tokens:
            return False
        tokens = (last - first) * self.T
        st.remote_tried = True
        entries = [st.entry(i) for i in range(first, last)]
        if not self.policy.should_load(tokens, {"remote": (last - first) * self.block_bytes}):
            self.stats.add("policy_skipped_tokens", tokens)
            if self.policy.probe_due("remote") and (probe := self.store.fetch_remote(entries)) is not None:
                self._probes.append(probe)  # has the server recovered? timed in the background:
            return False                    # this request does not wait for it
        st.remote = self.store.fetch_remote(entries)
        if st.remote is None:  # too many fetches in flight already: go on with the local hit
            self.stats.add("remote_busy")
            return False
        self.stats.add("remote_fetches")
        return True
