"""SSDTier: persistent, checksummed, bounded block store on a local filesystem.

On disk, a directory holds
  LOCK                one process owns the directory (flock)
  manifest.sqlite3    one row per block (see manifest.py)
  segment-NNNNN.kvs   fixed-size slots; slot i of a segment at i * slot_stride

A slot has the same geometry as a CPU-tier slot: the block's bytes at offset 0,
then a self-describing header (slot_header.py), padded to 4096, so one O_DIRECT
transfer moves a CPU slot to or from disk with no bounce copy.

Ordering is what makes a crash harmless: a block's bytes are written before
its row is committed, and a slot is reused only after the row freeing it is
committed. Every read checks the slot's header against the manifest and the
bytes against their xxh3_64, so a torn, stale, corrupt, truncated or foreign
slot is a miss, never wrong bytes.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import logging
import os
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
from kvplug.tiers.slots import ALIGN, slot_stride

log = logging.getLogger("kvplug")

SEGMENT_BYTES = 1 << 30   # target segment file size
EVICT_BATCH = 16          # most victims freed per manifest commit when full


def _u8(buf) -> np.ndarray:
    """A flat uint8 view (no copy) of a tensor, array or buffer."""
    arr = np.asarray(buf)
    if arr.dtype != np.uint8 or not arr.flags.c_contiguous:
        raise TypeError(f"expected a contiguous uint8 buffer, got {arr.dtype} {arr.shape}")
    return arr.reshape(-1)


@dataclass(slots=True)
class _Entry:
    slot: int            # global slot number
    checksum: int
    foreign: bool = False  # stored under another fingerprint/format: kept, never served
    pins: int = 0          # reads in flight; a pinned slot is never evicted or reused
    dropped: bool = False  # row deleted (committed); free the slot at the last unpin


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
        # Batching evictions saves commits; a small tier keeps exact LRU.
        self._evict_batch = min(EVICT_BATCH, max(1, self.num_slots // 64))
        self._io = io or FileIO()
        self._lock = threading.Lock()
        self._index: OrderedDict[bytes, _Entry] = OrderedDict()  # LRU first
        self._free: list[int] = []
        self._pending: dict[bytes, cf.Future] = {}
        self._touched: dict[bytes, int] = {}
        self._fds: dict[int, int] = {}
        self._stats: Counter[str] = Counter()
        self._logged: set[str] = set()
        self._bounce = threading.local()
        self._pool: cf.ThreadPoolExecutor | None = None
        os.makedirs(path, exist_ok=True)
        self._lock_fd = lock_directory(path)
        try:
            self.o_direct = self._choose_direct(o_direct)
            self._manifest = Manifest(os.path.join(path, "manifest.sqlite3"), {
                "block_bytes": block_bytes, "slot_stride": self.slot_stride,
                "slots_per_segment": self.slots_per_segment})
            if self._manifest.reset_reason:
                self._count("manifest_resets")
            self._load()
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._pool = cf.ThreadPoolExecutor(io_threads, thread_name_prefix="kvplug-ssd")

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
        self._free = [g for g in range(self.num_slots - 1, -1, -1) if g not in used]
        self._clock = max((r.last_access for r in manifest.rows), default=0) + 1
        manifest.rows = []
        # Segment files past the capacity hold nothing reachable.
        keep = -(-self.num_slots // self.slots_per_segment)
        for name in os.listdir(self.path):
            num = name[len("segment-"):-len(".kvs")]
            if name.startswith("segment-") and name.endswith(".kvs") and num.isdigit() and int(num) >= keep:
                os.unlink(os.path.join(self.path, name))

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
        self._pool.submit(self._run_write, fut, key, parent, tokens_array(tokens), data)
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
        return self._pool.submit(self._run_read, key, e, out)

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
        if self._pool is None:
            return
        self.flush()
        self._pool.shutdown(wait=True)
        self._pool = None
        for fd in self._fds.values():
            try:
                self._io.sync(fd)
                self._io.close(fd)
            except OSError as e:
                self._fault("close", e)
        self._fds.clear()
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

    # -- internals: writes ----------------------------------------------------

    def _run_write(self, fut: cf.Future, key: bytes, parent: bytes, tokens: np.ndarray, data) -> None:
        ok, slot, error = False, None, None
        try:
            buf, _ = self._slot_buffer(data, for_write=True)
            slot = self._allocate()
            if slot is None:
                self._count("write_failures_all_pinned")
                return
            csum = slot_header.pack(buf, self.block_bytes, self.fingerprint, key)
            fd, offset = self._locate(slot)
            n = self._io.pwrite(fd, buf[:self.slot_stride], offset)
            if n != self.slot_stride:
                raise OSError(errno.ENOSPC, f"short write ({n} of {self.slot_stride} bytes)")
            seg, s = divmod(slot, self.slots_per_segment)
            with self._lock:
                touches = [(t, k) for k, t in self._touched.items()]
                self._touched.clear()
                access = self._tick()
            self._manifest.insert(Row(key, parent, tokens.astype("<i8").tobytes(), seg, s, csum,
                                      self.fingerprint, FORMAT_VERSION, access), touches)
            with self._lock:
                self._index[key] = _Entry(slot, csum)
                slot = None
                self._stats["writes"] += 1
                self._stats["write_bytes"] += self.block_bytes
            ok = True
        except OSError as e:
            self._fault("write", e)
        except sqlite3.Error as e:
            self._fault("manifest", e)
        except Exception as e:  # a caller's mistake (bad buffer): raise it from the future
            error = e
        finally:
            with self._lock:
                if slot is not None:
                    self._free.append(slot)  # no committed row points at it
                if not ok:
                    self._stats["write_failures"] += 1
                del self._pending[key]
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(ok)

    def _allocate(self) -> int | None:
        """A free slot, evicting least-recently-used unpinned blocks if none."""
        with self._lock:
            if self._free:
                return self._free.pop()
            victims = []
            for key, e in self._index.items():
                if e.pins == 0:
                    victims.append(key)
                    if len(victims) == self._evict_batch:
                        break
            if not victims:
                return None
            entries = [self._index.pop(k) for k in victims]
        # If this raises, the rows may survive: their slots stay out of use until restart.
        self._manifest.delete(victims)
        with self._lock:
            # Out of the index, so no read could pin them since: all free now.
            self._stats["evictions"] += len(entries)
            for k in victims:
                self._touched.pop(k, None)
            self._free.extend(e.slot for e in entries)
            return self._free.pop()

    # -- internals: reads -----------------------------------------------------

    def _run_read(self, key: bytes, e: _Entry, out) -> bool:
        problem = None
        try:
            arr = _u8(out)
            buf, bounced = self._slot_buffer(arr, for_write=False)
            fd, offset = self._locate(e.slot)
            n = self._io.pread(fd, buf[:self.slot_stride], offset)
            problem = "truncated" if n < self.slot_stride else slot_header.verify(
                buf, self.block_bytes, self.fingerprint, key, e.checksum)
            if problem is None:
                if bounced:
                    arr[:self.block_bytes] = np.asarray(buf)[:self.block_bytes]
                with self._lock:
                    self._stats["read_hits"] += 1
                    self._stats["read_bytes"] += self.block_bytes
                return True
            self._count("corruptions")
            self._count(f"corruptions_{problem}")
            self._log_once(f"corrupt_{problem}", "kvplug SSD tier: %s block in %s dropped (%s)",
                           problem, self.path, key.hex())
        except OSError as err:
            self._fault("read", err)
        finally:
            self._unpin(e)
        with self._lock:
            self._stats["read_misses"] += 1
        self._drop(key, e)
        return False

    # -- internals: shared ----------------------------------------------------

    def _slot_buffer(self, data, for_write: bool) -> tuple[memoryview, bool]:
        """(buffer, bounced): the caller's own when one slot-sized (O_DIRECT) transfer
        can use it in place, else this thread's aligned bounce buffer."""
        arr = _u8(data)
        if arr.size < self.block_bytes:
            raise ValueError(f"buffer of {arr.size} bytes < block_bytes {self.block_bytes}")
        aligned = not self.o_direct or arr.ctypes.data % ALIGN == 0
        if arr.size >= self.slot_stride and aligned and arr.flags.writeable:
            return memoryview(arr), False
        bounce = getattr(self._bounce, "buf", None)
        if bounce is None:
            bounce = self._bounce.buf = aligned_buffer(self.slot_stride)
        if for_write:
            np.asarray(bounce)[:self.block_bytes] = arr[:self.block_bytes]
        return bounce, True

    def _locate(self, slot: int) -> tuple[int, int]:
        seg, s = divmod(slot, self.slots_per_segment)
        fd = self._fds.get(seg)
        if fd is None:
            with self._lock:
                fd = self._fds.get(seg)
                if fd is None:
                    path = os.path.join(self.path, f"segment-{seg:05d}.kvs")
                    fd = self._fds[seg] = self._io.open(path, self.o_direct)
        return fd, s * self.slot_stride

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
        # Caller holds self._lock. Access times reach SQLite with the next write.
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
