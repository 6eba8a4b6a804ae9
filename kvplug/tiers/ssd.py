"""SSDTier: persistent, checksummed, bounded block store on a local filesystem.

On disk, a directory holds
  LOCK                one process owns the directory (flock)
  manifest.sqlite3    one row per block (manifest.py)
  segment-NNNNN.kvs   fixed-size slots (segments.py)

A slot has the geometry of a CPU-tier slot: the block's bytes at offset 0,
then a self-describing header (slot_header.py), padded to 4096, so a CPU slot
moves to or from disk in place, with O_DIRECT where the filesystem allows.

Ordering is what makes a crash harmless: a block's bytes are written before
its row is committed, and a slot is reused only after the row freeing it is
committed. Every read checks the slot's header against the manifest and the
bytes against their xxh3_64, so a torn, stale, corrupt, truncated or foreign
slot is a miss, never wrong bytes.

Reads and writes queue up; each I/O thread takes a batch, moves runs of
consecutive slots with one syscall each and commits the batch's rows
together. Python work per block stays small, which matters with the GIL.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import logging
import os
import queue
import sqlite3
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import xxhash

from kvplug.keys import FORMAT_VERSION, KEY_BYTES, tokens_array
from kvplug.tiers import slot_header
from kvplug.tiers.aligned_io import FileIO, aligned_buffer, lock_directory, probe_direct
from kvplug.tiers.manifest import Manifest, Row
from kvplug.tiers.segments import Segments
from kvplug.tiers.slots import ALIGN, slot_stride

log = logging.getLogger("kvplug")

SEGMENT_BYTES = 1 << 30   # target segment file size
MAX_BATCH = 32            # most queued transfers one I/O thread takes at once


def _u8(buf) -> np.ndarray:
    """A flat uint8 view (no copy) of a tensor, array or buffer."""
    arr = np.asarray(buf)
    if arr.dtype != np.uint8 or not arr.flags.c_contiguous:
        raise TypeError(f"expected a contiguous uint8 buffer, got {arr.dtype} {arr.shape}")
    return arr.reshape(-1)


@dataclass(slots=True)
class _Entry:
    slot: int              # global slot number
    checksum: int
    foreign: bool = False  # stored under another fingerprint/format: kept, never served
    pins: int = 0          # reads in flight; a pinned slot is never evicted or reused
    dropped: bool = False  # row deleted (committed); free the slot at the last unpin


@dataclass(slots=True, eq=False)
class _Op:
    fut: cf.Future
    key: bytes
    data: object                   # the caller's buffer
    write: bool
    parent: bytes = b""
    tokens: np.ndarray | None = None
    entry: _Entry | None = None    # reads: the pinned entry
    buf: memoryview | None = None  # what the I/O uses: the caller's slot or a bounce buffer
    bounced: bool = False
    slot: int | None = None        # writes: the slot given to it
    checksum: int = 0


class SSDTier:
    def __init__(self, path: str, capacity_bytes: int, block_bytes: int, fingerprint: bytes,
                 io_threads: int = 4, o_direct: str = "auto", io: FileIO | None = None) -> None:
        if o_direct not in ("auto", "on", "off"):
            raise ValueError(f"o_direct={o_direct!r}; expected 'auto', 'on' or 'off'")
        self.path = path
        self.block_bytes = block_bytes
        self.slot_stride = slot_stride(block_bytes)
        self.num_slots = capacity_bytes // self.slot_stride
        if block_bytes <= 0 or self.num_slots < 1:
            raise ValueError(f"SSD tier at {path}: capacity_bytes={capacity_bytes} holds no slot of "
                             f"{self.slot_stride} bytes (block_bytes={block_bytes})")
        # Headers hold 16 bytes of fingerprint; a longer one is hashed down.
        self.fingerprint = fingerprint if len(fingerprint) == 16 else xxhash.xxh3_128_digest(fingerprint)
        self.slots_per_segment = max(1, SEGMENT_BYTES // self.slot_stride)
        self._io_threads = io_threads
        self._lock = threading.Lock()
        self._index: OrderedDict[bytes, _Entry] = OrderedDict()  # least recently used first
        self._free: list[int] = []
        self._pending: dict[bytes, cf.Future] = {}  # writes queued or in flight
        self._touched: dict[bytes, int] = {}        # access times not yet in the manifest
        self._clock = 0
        self._stats: Counter[str] = Counter()
        self._logged: set[str] = set()
        self._ops: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        os.makedirs(path, exist_ok=True)
        self._lock_fd = lock_directory(path)
        try:
            self.o_direct = self._choose_direct(o_direct)
            self._segments = Segments(path, self.slot_stride, self.slots_per_segment, self.o_direct,
                                      io or FileIO())
            self._manifest = Manifest(os.path.join(path, "manifest.sqlite3"), {
                "block_bytes": block_bytes, "slot_stride": self.slot_stride,
                "slots_per_segment": self.slots_per_segment})
            if self._manifest.reset_reason:
                self._count("manifest_resets")
            self._load()
        except BaseException:
            os.close(self._lock_fd)
            raise
        for i in range(io_threads):
            t = threading.Thread(target=self._work, name=f"kvplug-ssd-{i}", daemon=True)
            t.start()
            self._workers.append(t)

    # -- start-up -------------------------------------------------------------

    def _choose_direct(self, mode: str) -> bool:
        if mode == "off":
            return False
        why = probe_direct(self.path)
        if why is None:
            return True
        if mode == "on":
            raise OSError(errno.EINVAL, f"kvplug SSD tier: o_direct='on' but {self.path} does not support O_DIRECT ({why})")
        log.info("kvplug SSD tier: O_DIRECT unavailable in %s (%s); using buffered I/O", self.path, why)
        return False

    def _load(self) -> None:
        """Index the manifest's rows; drop (and count) the ones that cannot be right."""
        manifest = self._manifest
        bad = manifest.dropped_rows  # failed their row check
        own, foreign, used, drop = [], [], set(), []
        for r in manifest.rows:  # oldest access first
            g = r.segment * self.slots_per_segment + r.slot
            if not 0 <= r.slot < self.slots_per_segment or g in used or len(r.key) != KEY_BYTES \
                    or len(r.tokens) % 8:
                bad += 1
                drop.append(r.key)
            elif not 0 <= g < self.num_slots:
                drop.append(r.key)  # capacity shrank since
            else:
                used.add(g)
                is_foreign = r.fingerprint != self.fingerprint or r.format != FORMAT_VERSION
                (foreign if is_foreign else own).append((r.key, _Entry(g, r.checksum, is_foreign)))
        if drop:
            manifest.delete(drop)
        self._count("corruptions", bad)
        self._count("corruptions_manifest", bad)
        # Blocks of another model or format are never served here: evict them first.
        self._index.update(foreign + own)
        self._free = [g for g in range(self.num_slots - 1, -1, -1) if g not in used]  # pop() -> slot 0 first
        self._clock = max((r.last_access for r in manifest.rows), default=0) + 1
        manifest.rows = []
        self._segments.prune(self.num_slots)

    # -- public API -----------------------------------------------------------

    def entries(self) -> Iterator[tuple[bytes, bytes, np.ndarray]]:
        with self._lock:
            live = {k for k, e in self._index.items() if not e.foreign}
        for key, parent, tokens in self._manifest.entries(self.fingerprint, FORMAT_VERSION):
            if key in live:
                yield key, parent, np.frombuffer(tokens, "<i8").astype(np.int64)

    def contains(self, key: bytes) -> bool:
        with self._lock:
            e = self._index.get(key)
            return e is not None and not e.foreign

    def write(self, key: bytes, parent: bytes, tokens, data) -> cf.Future:
        if len(key) != KEY_BYTES:
            raise ValueError(f"block keys are {KEY_BYTES} bytes, got {len(key)}")
        with self._lock:
            e = self._index.get(key)
            if e is not None and not e.foreign:
                self._touch(key)
                return _done(True)
            if key in self._pending:
                return self._pending[key]
            fut: cf.Future = cf.Future()
            self._pending[key] = fut
        self._ops.put(_Op(fut, key, data, True, parent, tokens_array(tokens)))
        return fut

    def read(self, key: bytes, out) -> cf.Future:
        with self._lock:
            self._stats["reads"] += 1
            e = self._index.get(key)
            if e is None or e.foreign:
                self._stats["read_misses"] += 1
                return _done(False)
            e.pins += 1
            self._touch(key)
        fut: cf.Future = cf.Future()
        self._ops.put(_Op(fut, key, out, False, entry=e))
        return fut

    def delete(self, key: bytes) -> None:
        with self._lock:
            e = self._index.get(key)
        if e is not None:
            self._drop(key, e)

    def flush(self) -> None:
        with self._lock:
            pending = list(self._pending.values())
        cf.wait(pending)

    def close(self) -> None:
        if not self._workers:
            return
        self.flush()
        for _ in self._workers:
            self._ops.put(None)
        for t in self._workers:
            t.join()
        self._workers = []
        for err in self._segments.close():
            self._fault("sync", err)
        self._persist_touches()
        self._manifest.close()
        os.close(self._lock_fd)  # releases the flock

    def __enter__(self) -> "SSDTier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict[str, int | float]:
        with self._lock:
            foreign = sum(e.foreign for e in self._index.values())
            out: dict[str, int | float] = {
                "blocks": len(self._index) - foreign,
                "foreign_blocks": foreign,
                "bytes": (len(self._index) - foreign) * self.block_bytes,
                "capacity_blocks": self.num_slots,
                "capacity_bytes": self.num_slots * self.slot_stride,
                "o_direct": int(self.o_direct),
                "writes_in_flight": len(self._pending),
            }
            for k in ("reads", "read_hits", "read_misses", "read_bytes", "writes", "write_failures",
                      "write_bytes", "evictions", "corruptions", "io_faults", "manifest_resets"):
                out[k] = self._stats[k]
            out.update(self._stats)
        return out

    # -- I/O threads ----------------------------------------------------------

    def _work(self) -> None:
        while True:
            op = self._ops.get()
            if op is None:
                return
            # Take a fair share of what is queued: one syscall per run of slots, one commit per batch.
            batch, stop = [op], False
            share = min(MAX_BATCH, 1 + self._ops.qsize() // self._io_threads)
            while len(batch) < share:
                try:
                    op = self._ops.get_nowait()
                except queue.Empty:
                    break
                if op is None:
                    stop = True
                    break
                batch.append(op)
            writes = [op for op in batch if op.write]
            if writes:
                self._write_batch(writes)
            if len(writes) < len(batch):
                self._read_batch([op for op in batch if not op.write])
            if stop:
                return

    def _write_batch(self, ops: list[_Op]) -> None:
        """Bytes first; the rows follow through the manifest's group commit,
        and this thread moves on meanwhile."""
        ready = []
        for op in ops:
            try:
                op.buf, op.bounced = self._slot_buffer(op.data, for_write=True)
                ready.append(op)
            except Exception as e:  # a caller's mistake (a bad buffer): raise it from the future
                self._finish_write(op, e)
        try:
            slots = self._allocate(len(ready))
        except sqlite3.Error as e:
            for op in ready:
                self._finish_write(op, e)
            return
        for op in ready[len(slots):]:
            self._count("write_failures_all_pinned")
            self._finish_write(op, None)
        ready = ready[:len(slots)]
        for op, slot in zip(ready, sorted(slots)):
            op.slot = slot
            op.checksum = slot_header.pack(op.buf, self.block_bytes, self.fingerprint, op.key)
        results = self._segments.transfer(True, [(op.slot, op.buf[:self.slot_stride]) for op in ready])
        written = []
        for op, result in zip(ready, results):
            if isinstance(result, OSError):
                self._finish_write(op, result)
            else:
                written.append(op)
        if not written:
            return
        with self._lock:
            touches = [(t, k) for k, t in self._touched.items()]
            self._touched.clear()
            access = self._tick()
        rows = [Row(op.key, op.parent, op.tokens.astype("<i8").tobytes(), *divmod(op.slot, self.slots_per_segment),
                    op.checksum, self.fingerprint, FORMAT_VERSION, access) for op in written]
        try:
            committed = self._manifest.insert(rows, touches)
        except (sqlite3.Error, RuntimeError) as e:
            for op in written:
                self._finish_write(op, e)
            return
        committed.add_done_callback(lambda f: [self._finish_write(op, f.exception()) for op in written])

    def _finish_write(self, op: _Op, error: BaseException | None) -> None:
        """Publish a committed block, or give its slot back: no committed row points at it."""
        ok = error is None and op.slot is not None
        with self._lock:
            if ok:
                self._index[op.key] = _Entry(op.slot, op.checksum)
                self._stats["writes"] += 1
                self._stats["write_bytes"] += self.block_bytes
            else:
                if op.slot is not None:
                    self._free.append(op.slot)
                self._stats["write_failures"] += 1
            del self._pending[op.key]
        if isinstance(error, OSError):
            self._fault("write", error)
        elif isinstance(error, (sqlite3.Error, RuntimeError)):
            self._fault("manifest", error)
        elif error is not None:
            return op.fut.set_exception(error)
        op.fut.set_result(ok)

    def _allocate(self, n: int) -> list[int]:
        """Up to n free slots, evicting least-recently-used unpinned blocks to make room."""
        with self._lock:
            slots = self._free[len(self._free) - min(n, len(self._free)):]
            del self._free[len(self._free) - len(slots):]
            victims = []
            if len(slots) < n:
                for key, e in self._index.items():
                    if e.pins == 0:
                        victims.append(key)
                        if len(slots) + len(victims) == n:
                            break
            entries = [self._index.pop(k) for k in victims]
        if victims:
            try:
                self._manifest.delete(victims)
            except sqlite3.Error:
                with self._lock:  # the victims' rows may survive: leave their slots unused
                    self._free.extend(slots)
                raise
        with self._lock:
            # Out of the index, so no read pinned them since: their slots are free now.
            self._stats["evictions"] += len(entries)
            for k in victims:
                self._touched.pop(k, None)
        return slots + [e.slot for e in entries]

    def _read_batch(self, ops: list[_Op]) -> None:
        ready = []
        for op in ops:
            try:
                op.buf, op.bounced = self._slot_buffer(op.data, for_write=False)
                ready.append(op)
            except Exception as e:
                self._unpin(op.entry)
                op.fut.set_exception(e)
        results = self._segments.transfer(False, [(op.entry.slot, op.buf[:self.slot_stride]) for op in ready])
        for op, result in zip(ready, results):
            self._finish_read(op, result)

    def _finish_read(self, op: _Op, result: int | OSError) -> None:
        if isinstance(result, OSError):
            self._fault("read", result)
            problem = None
        else:
            problem = "truncated" if result < self.slot_stride else slot_header.verify(
                op.buf, self.block_bytes, self.fingerprint, op.key, op.entry.checksum)
            if problem is None:
                if op.bounced:
                    _u8(op.data)[:self.block_bytes] = np.frombuffer(op.buf, np.uint8, self.block_bytes)
                self._unpin(op.entry)
                with self._lock:
                    self._stats["read_hits"] += 1
                    self._stats["read_bytes"] += self.block_bytes
                return op.fut.set_result(True)
            self._count("corruptions")
            self._count(f"corruptions_{problem}")
            self._log_once(f"corrupt_{problem}", "kvplug SSD tier: %s block %s in %s dropped (%s)",
                           problem, op.key.hex(), self.path, "later ones are counted, not logged")
        self._unpin(op.entry)
        self._count("read_misses")
        self._drop(op.key, op.entry)
        op.fut.set_result(False)

    # -- shared ---------------------------------------------------------------

    def _slot_buffer(self, data, for_write: bool) -> tuple[memoryview, bool]:
        """(buffer, bounced): the caller's own when a slot-sized transfer can use
        it in place (long enough, aligned for O_DIRECT), else an aligned copy."""
        arr = _u8(data)
        if arr.size < self.block_bytes:
            raise ValueError(f"buffer of {arr.size} bytes < block_bytes {self.block_bytes}")
        aligned = not self.o_direct or arr.ctypes.data % ALIGN == 0
        if arr.size >= self.slot_stride and aligned and arr.flags.writeable:
            return memoryview(arr), False
        bounce = aligned_buffer(self.slot_stride)
        if for_write:
            np.frombuffer(bounce, np.uint8, self.block_bytes)[:] = arr[:self.block_bytes]
        return bounce, True

    def _drop(self, key: bytes, e: _Entry) -> None:
        """Forget a block; its slot is reusable once the row is gone and no read holds it."""
        with self._lock:
            if self._index.get(key) is not e:
                return
            del self._index[key]
            self._touched.pop(key, None)
        try:
            self._manifest.delete([key])
        except sqlite3.Error as err:
            self._fault("manifest", err)
            return  # the row may survive: never reuse its slot in this run
        with self._lock:
            e.dropped = True
            if e.pins == 0:
                self._free.append(e.slot)

    def _unpin(self, e: _Entry) -> None:
        with self._lock:
            e.pins -= 1
            if e.dropped and e.pins == 0:
                self._free.append(e.slot)

    def _touch(self, key: bytes) -> None:
        # Caller holds self._lock. Access times reach SQLite with the next commit.
        self._index.move_to_end(key)
        self._touched[key] = self._tick()

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _persist_touches(self) -> None:
        with self._lock:
            touches = [(t, k) for k, t in self._touched.items()]
            self._touched.clear()
        try:
            self._manifest.touch(touches)
        except sqlite3.Error as err:
            self._fault("manifest", err)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._stats[name] += n

    def _fault(self, op: str, err: Exception) -> None:
        kind = f"{op}_{errno.errorcode.get(getattr(err, 'errno', None) or 0, type(err).__name__)}"
        self._count("io_faults")
        self._count(f"io_faults_{kind}")
        self._log_once(kind, "kvplug SSD tier: %s fault in %s: %s (counted in stats; later ones are not logged)",
                       kind, self.path, err)

    def _log_once(self, kind: str, msg: str, *args) -> None:
        with self._lock:
            if kind in self._logged:
                return
            self._logged.add(kind)
        log.warning(msg, *args)


def _done(value: bool) -> cf.Future:
    fut: cf.Future = cf.Future()
    fut.set_result(value)
    return fut
