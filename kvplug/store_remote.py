"""The store's remote tier: CPU blocks written to a shared server, fetched blocks promoted into CPU slots.

A mixin of ``TieredStore`` (kvplug/store.py), apart because it is one concern.

Writes: with ``remote_write=through`` every block that becomes visible in the
CPU tier is queued for the server; with ``back`` only blocks leaving it. The
block's slot stays pinned until the writer thread has sent it (its bytes go
as stored: int4h blocks encoded). A full queue or a server that is down drops
the write (counted) and unpins at once: never block the caller. Blocks that
came from the server are not written back.

Reads: ``fetch_remote`` asks the server for a run of blocks in one pipelined
round trip on a reader thread and returns a ``RemoteFetch`` at once. When
the reply is in, the leading blocks that came back verified are stored into
CPU slots like any other block (two-phase: invisible until written), so the
caller's next lookup finds them as CPU hits. Nothing here runs a network
round trip on the caller's thread.
"""

from __future__ import annotations

import logging
import threading
import time
from functools import partial
from typing import Sequence

from kvplug.blocks import StoreEntry
from kvplug.tiers import remote_url

log = logging.getLogger("kvplug")


class RemoteFetch:
    """A fetch in flight: ``done()`` once its blocks have landed in the CPU tier (or not)."""

    def __init__(self, blocks: int, block_bytes: int):
        self.blocks, self.block_bytes = blocks, block_bytes
        self.asked = time.monotonic()
        self.done_at = 0.0
        self.found = 0     # leading blocks the server returned, verified
        self.landed = 0    # of those, stored into CPU slots by this fetch
        self.abandoned = False
        self._future = None
        self._done = threading.Event()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def abandon(self) -> None:
        """Its request goes on without it: not sent if still queued, not landed if it comes back."""
        self.abandoned = True
        if self._future is not None:
            self._future.cancel()  # only a fetch still queued is cancelled; a running one ends on its own

    def _finish(self, found: int, landed: int) -> None:
        self.found, self.landed, self.done_at = found, landed, time.monotonic()
        self._done.set()


class RemoteTransfers:
    remote = None

    def _init_remote(self, config, fingerprint: bytes, block_bytes: int) -> None:
        self._remote_origin: set[bytes] = set()  # resident blocks fetched from the server: never written back
        if not config.remote_url:
            return
        # Queued writes pin CPU slots and fetched blocks land in them: each gets at most a quarter of
        # the slots (fetches in flight together too), so that neither can take the CPU tier from the
        # requests it serves. The slot count depends on the model's block size, so a larger setting
        # is clamped here (noted), not refused.
        from kvplug.tiers.remote import FETCHES_IN_FLIGHT, RemoteTier  # imports redis: only with a remote tier

        quarter = max(1, self.cpu.num_slots // 4)
        self.remote_fetch_blocks = min(config.remote_fetch_blocks, quarter)
        fetches = max(1, min(FETCHES_IN_FLIGHT, quarter // self.remote_fetch_blocks))
        queue_blocks = min(config.remote_queue_blocks, quarter)
        for key, value, used in (("remote_fetch_blocks", config.remote_fetch_blocks, self.remote_fetch_blocks),
                                 ("remote_queue_blocks", config.remote_queue_blocks, queue_blocks)):
            if used < value:
                log.warning("kvplug store: %s=%d is more than a quarter of the CPU tier's %d slots; using %d",
                            key, value, self.cpu.num_slots, used)
        self.remote = RemoteTier(
            remote_url.parse(config.remote_url), fingerprint=fingerprint, block_bytes=block_bytes,
            codec=config.codec, namespace=config.remote_namespace,
            cluster={"auto": None, "on": True, "off": False}[config.remote_cluster],
            username=config.remote_username, password=config.remote_secret(), timeout_s=config.remote_timeout_s,
            retry_s=config.remote_retry_s, tls_ca_file=config.remote_tls_ca_file, queue_blocks=queue_blocks, secret=config.integrity_secret(),
            fetches_in_flight=fetches)

    # -- writes (hooks called under the store's lock) ----------------------------------------

    def _remote_stored(self, key: bytes, jobs: list) -> None:
        """A block became visible in the CPU tier."""
        if self.remote is not None and self.config.remote_write == "through":
            if key in self._remote_origin:
                self._remote_origin.discard(key)
            else:
                self._queue_remote_write(key, jobs)

    def _remote_evicted(self, key: bytes, jobs: list) -> None:
        """A visible block leaves the CPU tier."""
        if self.remote is not None:
            fetched = key in self._remote_origin
            self._remote_origin.discard(key)
            if self.config.remote_write == "back" and not fetched:
                self._queue_remote_write(key, jobs)

    def _queue_remote_write(self, key: bytes, jobs: list) -> None:
        parent, tokens = self._index.entry(key)
        if len(tokens) < self.block_tokens:
            return  # full blocks only: a partial tail is found through a local index, which the server lacks
        block = self._resident[key]
        block.pin()  # the slot's bytes are read by the writer thread
        jobs.append(partial(self._remote_put, key, parent, tokens, block.slot))

    def _remote_put(self, key: bytes, parent: bytes, tokens, slot: int) -> None:
        payload = self.cpu.block_view(slot).numpy()
        if not self.remote.put(key, parent, tokens, payload, partial(self._remote_written, key)):
            self._remote_written(key, False)  # dropped: queue full or server down

    def _remote_written(self, key: bytes, ok: bool) -> None:
        with self._lock:
            self._unpin(key)

    # -- reads ---------------------------------------------------------------------------

    def fetch_remote(self, entries: Sequence[StoreEntry]) -> RemoteFetch | None:
        """Fetch these consecutive blocks (a chain: each one's parent the key before it; at most
        ``remote_fetch_blocks``, the rest are not asked for) in the background; the leading ones the
        server has, verified, land in the CPU tier. None when too many fetches are in flight."""
        from kvplug.tiers.remote import Wanted

        entries = list(entries)[:self.remote_fetch_blocks]
        fetch = RemoteFetch(len(entries), self.block_bytes)
        future = self.remote.fetch([Wanted(e.key, e.parent, e.tokens) for e in entries])
        if future is None:
            return None
        fetch._future = future
        future.add_done_callback(partial(self._remote_fetched, entries, fetch))
        return fetch

    def _remote_fetched(self, entries: list[StoreEntry], fetch: RemoteFetch, future) -> None:
        try:
            payloads = [] if future.cancelled() else future.result()
            found = []
            for entry, payload in zip(entries, payloads):
                if payload is None:
                    break  # a prefix is contiguous: nothing past a missing block is usable
                found.append((entry, payload))
            if fetch.abandoned and found:  # its request went on without it: evict nothing for it
                with self._lock:
                    self._stats["remote_abandoned_blocks"] += len(found)
            landed = self._land(found) if found and not self._closed and not fetch.abandoned else []
        except Exception:
            log.exception("kvplug store: a remote fetch could not be stored")
            found, landed = [], []
        fetch._finish(len(found), len(landed))

    def _land(self, found: list) -> list[bytes]:
        """Store fetched blocks into CPU slots (no slot: that block and the rest are not stored)."""
        slots = self.prepare_store([entry for entry, _ in found])
        reserved = [entry.key for (entry, _), slot in zip(found, slots) if slot is not None]
        written = []
        try:
            for (entry, payload), slot in zip(found, slots):
                if slot is not None:
                    self.cpu.write_block(slot, payload)
                    written.append(entry.key)
        except Exception:  # the blocks before it land; its slot and the rest's are given back
            log.exception("kvplug store: a fetched block could not be copied into its CPU slot")
        self.abort_store(reserved[len(written):])
        with self._lock:
            self._remote_origin.update(written)
            self._stats["remote_promotions"] += len(written)
        self.complete_store(written)
        return written

    # -- stats and lifetime ------------------------------------------------------------------

    def remote_stats(self) -> dict | None:
        if self.remote is None:
            return None
        with self._lock:
            promotions, abandoned = self._stats["remote_promotions"], self._stats["remote_abandoned_blocks"]
        return self.remote.stats() | {"promotions": promotions, "abandoned_blocks": abandoned}

    def _close_remote(self, timeout: float) -> None:
        if self.remote is not None:
            if not self.remote.flush(timeout):
                log.warning("kvplug store: remote writes still queued at close; left behind")
            self.remote.close(timeout)
