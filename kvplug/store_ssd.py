"""The store's SSD transfers: write-backs of CPU slots and promotions into them.

A mixin of ``TieredStore`` (kvplug/store.py), apart because it is one concern:
queue a write or a read of a slot (pinning it), and settle the store's state
when the SSD tier's future completes on an I/O thread. Writes are queued under
the store's lock into ``jobs`` and started after it is released; a full write
queue drops the write (counted) rather than block the caller.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import time
from functools import partial
from typing import Callable

import numpy as np

from kvplug.block_state import BlockState

log = logging.getLogger("kvplug")


class SSDTransfers:
    def _queue_write(self, key: bytes, jobs: list) -> None:
        # Caller holds the lock. A full queue drops the write: never block the caller.
        if self._writes >= self.config.write_queue_blocks:
            self._stats["writes_dropped"] += 1
            return
        block = self._resident[key]
        block.writing = True
        block.pin()
        self._writes += 1
        self._stats["writes_queued"] += 1
        parent, tokens = self._index.entry(key)
        data = self.cpu.slot_view(self._resident[key].slot)  # the whole slot: room for the SSD header
        jobs.append(partial(self._submit, self.ssd.write, (key, parent, tokens, data), partial(self._write_done, key)))

    def _run(self, jobs: list[Callable[[], None]]) -> None:
        for job in jobs:
            job()

    @staticmethod
    def _submit(start: Callable[..., cf.Future], args: tuple, done: Callable[[cf.Future], None]) -> None:
        try:
            future = start(*args)
        except Exception as e:
            future = _failed(e)
        future.add_done_callback(done)

    def _write_done(self, key: bytes, future: cf.Future) -> None:
        ok = _succeeded(future, "write")
        with self._lock:
            self._resident[key].writing = False
            self._writes -= 1
            self._stats["writes_done" if ok else "writes_failed"] += 1
            self._unpin(key)
            self._idle.notify_all()

    def _read_done(self, key: bytes, future: cf.Future) -> None:
        ok = _succeeded(future, "read")
        with self._lock:
            block = self._resident[key]
            waiting, block.waiting = block.waiting, None
            self._reads -= 1
            ok = ok and key in self._index  # a reset meanwhile dropped it: its bytes are of an old epoch
            if ok:
                block.move(BlockState.VISIBLE)
                if self._events is not None:
                    self._events.append((True, key))
                self._policy.insert(key)
                self._stats["promotions"] += 1
            else:  # corrupt, foreign, I/O error or evicted by the SSD tier: gone
                self._stats["promotion_failures"] += 1
                block.move(BlockState.FAILED)
                self._forget_ssd_copy(key)
            self._unpin(key)
            self._idle.notify_all()
        for handle, i in waiting:
            handle._read_done(i, ok)

    def _on_ssd(self, key: bytes) -> bool:
        return self.ssd is not None and self.ssd.contains(key)

    def _ssd_dropped(self, keys: list[bytes]) -> None:
        """The SSD tier forgot these blocks on its own (eviction, corruption, a failed MAC, start-up)."""
        with self._lock:
            for key in keys:
                self._forget_ssd_copy(key)

    def _forget_ssd_copy(self, key: bytes) -> None:
        """Caller holds the lock. A block neither visible in the CPU tier nor on SSD leaves the index."""
        block = self._resident.get(key)
        if block is None or not block.visible:
            self._index.remove(key)

    def probe_ssd(self, key: bytes, done: Callable[[bool, float], None]) -> None:
        """Read one SSD block into a scratch buffer, in the background, to time the disk:
        ``done(ok, seconds)`` from an I/O thread. Nothing is pinned or promoted."""
        if self.ssd is None:
            return
        start, scratch = time.monotonic(), np.empty(self.block_bytes, np.uint8)

        def landed(future: cf.Future) -> None:
            done(not future.cancelled() and future.exception() is None and future.result() is True,
                 time.monotonic() - start)
        self._submit(self.ssd.read, (key, scratch), landed)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued SSD write has finished; False if some had not by ``timeout``."""
        with self._idle:
            done = self._idle.wait_for(lambda: not self._writes, timeout)
        if self.ssd is not None:
            done = self.ssd.flush(timeout) and done
        return done


def _failed(error: Exception) -> cf.Future:
    future: cf.Future = cf.Future()
    future.set_exception(error)
    return future


def _succeeded(future: cf.Future, what: str) -> bool:
    error = future.exception()
    if error is not None:
        log.warning("kvplug store: SSD %s failed: %r", what, error)
        return False
    return bool(future.result())
