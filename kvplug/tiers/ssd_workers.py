"""The SSD tier's I/O workers: batches of transfers taken from the queue.

A mixin of ``SSDTier`` (kvplug/tiers/ssd.py), apart because it is one
concern: each worker thread takes a batch, writes bytes before their manifest
rows (group commit), reads and verifies slots, and completes each transfer's
future. An error outside the expected ones (I/O and SQLite errors are counted
faults) turns the tier off rather than kill the thread silently.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import queue
import sqlite3
from dataclasses import dataclass

import numpy as np

from kvplug.keys import FORMAT_VERSION
from kvplug.tiers import slot_header
from kvplug.tiers.manifest import Row
from kvplug.tiers.slot_index import Entry

log = logging.getLogger("kvplug")


def _u8(buf) -> np.ndarray:
    """A flat uint8 view (no copy) of a tensor, array or buffer."""
    arr = np.asarray(buf)
    if arr.dtype != np.uint8 or not arr.flags.c_contiguous:
        raise TypeError(f"expected a contiguous uint8 buffer, got {arr.dtype} {arr.shape}")
    return arr.reshape(-1)


@dataclass(slots=True, eq=False)
class _Op:
    fut: cf.Future
    key: bytes
    data: object                   # the caller's buffer
    write: bool
    parent: bytes = b""            # writes
    tokens: np.ndarray | None = None
    entry: Entry | None = None     # reads: the pinned entry
    buf: memoryview | None = None  # what the I/O uses: the caller's slot or a bounce buffer
    bounced: bool = False
    slot: int | None = None        # writes: the slot given to it
    checksum: int = 0
    tag: bytes | None = None       # writes, with an integrity key: slot_header.meta_digest



class SSDWorkers:
    def _work(self) -> None:
        while True:
            batch = self._take()
            ops = [op for op in batch if op is not None]
            try:
                writes = [op for op in ops if op.write]
                reads = [op for op in ops if not op.write]
                if writes:
                    self._write_batch(self._prepare(writes))
                if reads:
                    self._read_batch(reads)
            except Exception as e:  # noqa: BLE001 - a bug or an unforeseen error: never die silently
                self._degrade(ops, e)
            if batch[-1] is None:
                return

    def _degrade(self, ops: list[_Op], error: Exception) -> None:
        """An I/O thread hit an error outside the expected ones: the tier goes off (every later
        transfer fails at once, so the store recomputes), the batch's transfers fail, and the
        thread lives on to drain the queue."""
        self._index.count("io_thread_errors")
        if not self.degraded:
            self.degraded = True
            log.error("kvplug SSD tier at %s: I/O thread error %r; the tier is off (degraded) until restart",
                      self.path, error, exc_info=error)
        for op in ops:
            if not op.write and op.entry is not None and not op.fut.done():
                self._index.unpin(op.entry)
            if not op.fut.done():
                op.fut.set_exception(error)

    def _take(self) -> list[_Op | None]:
        """The next transfer and, without waiting, a fair share of those queued behind it."""
        batch = [self._ops.get()]
        share = min(self._max_batch, 1 + self._ops.qsize() // self._io_threads)
        while batch[-1] is not None and len(batch) < share:
            try:
                batch.append(self._ops.get_nowait())
            except queue.Empty:
                break
        return batch

    def _prepare(self, ops: list[_Op]) -> list[_Op]:
        """Slots (evicting if need be), checksums and headers for a batch of writes."""
        ready = []
        for op in ops:
            try:
                op.buf, op.bounced = self._slot_buffer(op.data, for_write=True)
                ready.append(op)
            except Exception as e:  # a caller's mistake (a bad buffer): raise it from the future
                self._end_write(op, e)
        try:
            slots = self._allocate(len(ready))
        except sqlite3.Error as e:
            for op in ready:
                self._end_write(op, e)
            return []
        for op in ready[len(slots):]:
            self._index.count("write_failures_all_pinned")
            self._end_write(op, None)
        ready = ready[:len(slots)]
        for op, slot in zip(ready, sorted(slots)):
            op.slot = slot
            if self._mac_key is not None:
                op.tag = slot_header.meta_digest(op.key, op.parent, op.tokens.astype("<i8").tobytes())
            op.checksum = slot_header.pack(op.buf, self.block_bytes, self.fingerprint, op.key,
                                           self._mac_key, op.tag)
        return ready

    def _allocate(self, n: int) -> list[int]:
        """Up to n slots, evicting least-recently-used unpinned blocks to make room."""
        slots, victims = self._index.take_free(n)
        if not victims:
            return slots
        self._startup_entries = None
        try:
            self._manifest.delete([key for key, _ in victims])
        except sqlite3.Error:
            self._index.give_back(slots)  # the victims' rows may survive: leave their slots unused
            raise
        finally:
            self._report_drops([key for key, _ in victims])  # out of the map either way
        self._index.count("evictions", len(victims))
        slots += [e.slot for _, e in victims]
        self._index.give_back(slots[n:])  # the batch beyond this write's needs: free for the next
        return slots[:n]

    def _write_batch(self, ops: list[_Op]) -> None:
        """Bytes first; the rows follow through the manifest's group commit."""
        if not ops:
            return
        results = self._segments.transfer(True, [(op.slot, op.buf[:self.slot_stride]) for op in ops])
        written = []
        for op, result in zip(ops, results):
            if isinstance(result, OSError):
                self._end_write(op, result)
            else:
                written.append(op)
        if not written:
            return
        touches, access = self._index.take_touches()
        rows = [Row(op.key, op.parent, op.tokens.astype("<i8").tobytes(), *divmod(op.slot, self.slots_per_segment),
                    op.checksum, self.fingerprint, FORMAT_VERSION, access) for op in written]
        try:
            committed = self._manifest.insert(rows, touches)
        except (sqlite3.Error, RuntimeError) as e:
            for op in written:
                self._end_write(op, e)
            return
        committed.add_done_callback(lambda f: [self._end_write(op, f.exception()) for op in written])

    def _end_write(self, op: _Op, error: BaseException | None) -> None:
        ok = error is None and op.slot is not None
        fut = self._index.end_write(op.key, Entry(op.slot, op.checksum, tag=op.tag) if ok else None, op.slot)
        if ok:
            self._index.count("writes")
            self._index.count("write_bytes", self.block_bytes)
        else:
            self._index.count("write_failures")
        if isinstance(error, OSError):
            self._fault("write", error)
        elif isinstance(error, (sqlite3.Error, RuntimeError)):
            self._fault("manifest", error)
        elif error is not None:
            return fut.set_exception(error)
        fut.set_result(ok)

    def _read_batch(self, ops: list[_Op]) -> None:
        ready = []
        for op in ops:
            try:
                op.buf, op.bounced = self._slot_buffer(op.data, for_write=False)
                ready.append(op)
            except Exception as e:
                self._index.unpin(op.entry)
                op.fut.set_exception(e)
        results = self._segments.transfer(False, [(op.entry.slot, op.buf[:self.slot_stride]) for op in ready])
        for op, result in zip(ready, results):
            self._end_read(op, result)

    def _end_read(self, op: _Op, result: int | OSError) -> None:
        if isinstance(result, OSError):
            self._fault("read", result)
        else:
            problem = "truncated" if result < self.slot_stride else slot_header.verify(
                op.buf, self.block_bytes, self.fingerprint, op.key, op.entry.checksum,
                self._mac_key, op.entry.tag)
            if problem is None:
                if op.bounced:
                    _u8(op.data)[:self.block_bytes] = np.frombuffer(op.buf, np.uint8, self.block_bytes)
                self._index.unpin(op.entry)
                self._index.count("read_hits")
                self._index.count("read_bytes", self.block_bytes)
                return op.fut.set_result(True)
            self._index.count("corruptions")
            self._index.count(f"corruptions_{problem}")
            if self._index.first(f"corrupt_{problem}"):
                log.warning("kvplug SSD tier: %s block %s in %s dropped (later ones are counted, not logged)",
                            problem, op.key.hex(), self.path)
        self._drop(op.key, op.entry)  # while still pinned: the slot cannot be reused under it
        self._index.unpin(op.entry)
        self._index.count("read_misses")
        self._report_drops([op.key])
        op.fut.set_result(False)

