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

Transfers queue up; worker threads take them in batches, move runs of
consecutive slots with one syscall each and hand the written rows to the
manifest's committer, which commits each batch together. There are a few
more workers than ``io_threads``, the syscalls in flight at once, so that
checksums (which let go of the GIL) overlap the I/O instead of pausing it.

The directory is private (kvplug/tiers/ssd_dir.py): created 0700, refused if
another user owns it or can write it, or if it or a file of the tier is a
link; no file is opened through a link. Every manifest row is checked before
use (its row check, 1..block_tokens tokens, slot in range, bounded blob
lengths, sane clock: at start-up, in bulk; key = hash of parent and tokens:
by the store's index when a lookup first reaches the block, kvplug/index_check.py,
which hands a failing one to ``reject``); a bad row is dropped and counted,
never an abort.

Who can plant KV. Without ``integrity_key`` every check above is keyless:
anyone who can write the directory (this user, root, a restored backup, a
shared or network volume) can plant a block — bytes, header, checksum and a
consistent manifest row — that passes them all and is served as the KV of
the tokens the row names: the model then attends to KV of their choosing for
a prompt it never saw. With ``integrity_key`` (bytes; the config key
``integrity_key`` reads it from an environment variable or a file) each slot
header carries a keyed BLAKE2b MAC over the block's bytes, key, parent,
tokens, fingerprint and format (slot_header.py), verified on every read: a
block without a valid MAC, written without the key or with another one, is a
miss, dropped and counted (``corruptions_mac``, ``corruptions_mac_missing``);
a reader without a key does not serve blocks that carry one
(``corruptions_mac_unexpected``). What the MAC does not cover: a writer can
still delete blocks, replay this directory's own older blocks under the same
key (same key, same tokens: the same KV), replay an older EPOCH file (it
carries a MAC, but an old one is still valid: kvplug/epoch.py says what that
reaches), or fill the disk.

The tier forgets blocks on its own (LRU eviction, corrupt or unverifiable
blocks, rows dropped at start-up, capacity shrink): ``on_drop`` is called
with their keys, outside the tier's locks, from the constructor (start-up
drops, before it returns) or an I/O thread.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import logging
import os
import queue
import sqlite3
import threading
import time
from typing import Callable

import numpy as np
import xxhash

from kvplug.index_bulk import Blocks
from kvplug.keys import FORMAT_VERSION, KEY_BYTES, tokens_array
from kvplug.tiers import slot_header, ssd_dir
from kvplug.tiers.aligned_io import FileIO, aligned_buffer, lock_directory, probe_direct
from kvplug.tiers.manifest import Manifest
from kvplug.tiers.segments import Segments
from kvplug.tiers.slot_index import Entry
from kvplug.tiers.slots import ALIGN, slot_stride
from kvplug.tiers.ssd_startup import SSDStartup
from kvplug.tiers.ssd_workers import SSDWorkers, _Op, _u8

log = logging.getLogger("kvplug")

SEGMENT_BYTES = 1 << 30     # target segment file size
PREPARE_AHEAD = 2           # workers beyond io_threads: checksumming while the others do I/O
MAX_BATCH = 32              # most transfers handled as one batch...
MAX_BATCH_BYTES = 16 << 20  # ...and most bytes: big blocks gain nothing from batching
CLOSE_TIMEOUT_S = 30.0      # close() returns within about this, whatever the disk does
MAX_TOKENS = 1 << 16        # tokens a block may hold when block_tokens is not given


class SSDTier(SSDWorkers, SSDStartup):
    def __init__(self, path: str, capacity_bytes: int, block_bytes: int, fingerprint: bytes,
                 io_threads: int = 4, o_direct: str = "auto", io: FileIO | None = None, *,
                 block_tokens: int | None = None, integrity_key: bytes | None = None,
                 on_drop: Callable[[list[bytes]], None] | None = None) -> None:
        """``block_tokens``: most tokens a block holds (rows with more are dropped at start);
        ``integrity_key``: a secret; blocks carry a keyed MAC and are verified on read
        (kept only as a derived subkey, never logged); ``on_drop``: called with the keys
        of blocks the tier forgets on its own (see the module docstring)."""
        if o_direct not in ("auto", "on", "off"):
            raise ValueError(f"o_direct={o_direct!r}; expected 'auto', 'on' or 'off'")
        if integrity_key is not None and (not isinstance(integrity_key, (bytes, bytearray)) or not integrity_key):
            raise ValueError("integrity_key must be non-empty bytes (or None)")
        if block_tokens is not None and block_tokens < 1:
            raise ValueError(f"block_tokens={block_tokens}; expected a positive integer")
        self._mac_key = None if integrity_key is None else slot_header.derive_key(bytes(integrity_key))
        self._on_drop = on_drop
        self.block_tokens = block_tokens
        self._max_tokens = block_tokens or MAX_TOKENS
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
        self.degraded = False  # an I/O thread hit an unexpected error: the tier is off
        self._max_batch = max(1, min(MAX_BATCH, MAX_BATCH_BYTES // self.slot_stride))
        ssd_dir.prepare(path)       # 0700, ours, no link: else UnsafeDirectory
        ssd_dir.check_files(path)   # no tier file is a link (LOCK, EPOCH, manifest, segments)
        self._lock_fd = lock_directory(path)
        try:
            self.o_direct = self._choose_direct(o_direct)
            self._segments = Segments(path, self.slot_stride, self.slots_per_segment, self.o_direct,
                                      io or FileIO(), max_in_flight=io_threads)
            self._manifest = Manifest(os.path.join(path, ssd_dir.MANIFEST), {
                "block_bytes": block_bytes, "slot_stride": self.slot_stride,
                "slots_per_segment": self.slots_per_segment}, max_blob=max(4096, 8 * self._max_tokens))
            self._index, dropped = self._load()
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._ops: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._rejects: list[threading.Thread] = []  # deleting the manifest rows of rejected blocks
        self._threads = [threading.Thread(target=self._work, name=f"kvplug-ssd-{i}", daemon=True)
                         for i in range(io_threads + PREPARE_AHEAD)]
        for t in self._threads:
            t.start()
        self._report_drops(dropped)

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

    # -- public API -----------------------------------------------------------

    def entries(self) -> Blocks:
        """(key, parent, tokens) of every block of this fingerprint, as columns (iterable as
        tuples); the first call after opening takes the rows start-up read (no second pass
        over a large manifest). Their chains are unchecked: the index checks each at first use."""
        blocks, self._startup_entries = self._startup_entries, None
        if blocks is None:
            contains = self._index.contains
            rows = [(k, p, np.frombuffer(t, "<i8")) for k, p, t in self._manifest.entries(self.fingerprint, FORMAT_VERSION)
                    if contains(k) and len(p) == KEY_BYTES and not len(t) % 8 and 1 <= len(t) // 8 <= self._max_tokens]
            blocks = Blocks.of(rows) or Blocks(b"", b"", np.zeros((0, 1), np.int64), np.zeros(0, np.int32))
            blocks.checked = False
        return blocks

    def reject(self, keys: list[bytes]) -> None:
        """Blocks whose manifest row the index found not to chain (key is not the hash of its
        parent and tokens): dropped and counted as manifest corruptions, never served."""
        detached = []
        for key in keys:
            e = self._index.live(key)
            if e is None:
                continue
            for name in ("corruptions", "corruptions_manifest", "corruptions_manifest_chain"):
                self._index.count(name)
            self._startup_entries = None
            if self._index.detach(key, e):
                detached.append((key, e))
        if detached:  # a lookup on vLLM's scheduler thread found them: the rows go on another thread
            t = threading.Thread(target=self._forget_rows, args=(detached,), name="kvplug-ssd-reject", daemon=True)
            self._rejects.append(t)
            t.start()

    def _forget_rows(self, detached: list[tuple[bytes, Entry]]) -> None:
        """The manifest rows of detached blocks deleted, then their slots reusable (a failed delete
        may leave the rows: their slots are never reused in this run)."""
        try:
            self._manifest.delete([key for key, _ in detached])
        except sqlite3.Error as err:
            self._fault("manifest", err)
            return
        for _, e in detached:
            self._index.dropped(e)

    def contains(self, key: bytes) -> bool:
        return self._index.contains(key)

    def write(self, key: bytes, parent: bytes, tokens, data) -> cf.Future:
        if len(key) != KEY_BYTES:
            raise ValueError(f"block keys are {KEY_BYTES} bytes, got {len(key)}")
        tokens = tokens_array(tokens)
        if not 1 <= len(tokens) <= self._max_tokens:
            raise ValueError(f"a block holds 1..{self._max_tokens} tokens, got {len(tokens)}")
        if not self._threads:
            raise RuntimeError(f"kvplug SSD tier at {self.path} is closed")
        if self.degraded:
            return self._off()
        self._startup_entries = None
        fut, new = self._index.begin_write(key)
        if new:
            self._ops.put(_Op(fut, key, data, True, parent, tokens))
        return fut

    def read(self, key: bytes, out) -> cf.Future:
        if not self._threads:
            raise RuntimeError(f"kvplug SSD tier at {self.path} is closed")
        if self.degraded:
            return self._off()
        self._index.count("reads")
        fut: cf.Future = cf.Future()
        e = self._index.pin(key)
        if e is None:
            self._index.count("read_misses")
            fut.set_result(False)
        else:
            self._ops.put(_Op(fut, key, out, False, entry=e))
        return fut

    def _off(self) -> cf.Future:
        self._index.count("degraded_ops")
        fut: cf.Future = cf.Future()
        fut.set_exception(RuntimeError(f"kvplug SSD tier at {self.path} is off after an I/O thread error"))
        return fut

    def delete(self, key: bytes) -> None:
        e = self._index.live(key)
        if e is not None:
            self._drop(key, e)

    def delete_all(self) -> None:
        """Drop every block of this fingerprint (a cache reset), in one transaction."""
        self._startup_entries = None
        self._forget_rows(self._index.detach_all())

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for the writes in flight; False if some are still in flight after ``timeout``."""
        return not cf.wait(self._index.pending(), timeout=timeout).not_done

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Finish the transfers in flight and close, within about ``timeout`` seconds: a hung
        disk leaves its threads behind (daemons) rather than hang the engine's shutdown."""
        if not self._threads:
            return
        deadline = time.monotonic() + timeout
        for t in self._rejects:
            t.join(max(0.0, deadline - time.monotonic()))
        if not self.flush(timeout):
            log.warning("kvplug SSD tier at %s: writes still in flight after %.0f s at close; left behind",
                        self.path, timeout)
        for _ in self._threads:
            self._ops.put(None)
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            log.warning("kvplug SSD tier at %s: I/O threads still busy at close; left behind", self.path)
            self._threads = []
            return  # the manifest and segments stay open for the threads still using them
        self._threads = []
        for err in self._segments.close():
            self._fault("sync", err)
        touches, _ = self._index.take_touches()
        try:
            self._manifest.touch(touches)
        except sqlite3.Error as err:
            self._fault("manifest", err)
        self._manifest.close()
        os.close(self._lock_fd)  # releases the flock

    def __enter__(self) -> "SSDTier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict[str, int | float]:
        own, foreign, in_flight = self._index.counts()
        out: dict[str, int | float] = {
            "blocks": own, "foreign_blocks": foreign, "bytes": own * self.block_bytes,
            "capacity_blocks": self.num_slots, "capacity_bytes": self.num_slots * self.slot_stride,
            "o_direct": int(self.o_direct), "writes_in_flight": in_flight,
            "integrity": int(self._mac_key is not None),
        }
        with self._index.lock:
            for k in ("reads", "read_hits", "read_misses", "read_bytes", "writes", "write_failures",
                      "write_bytes", "evictions", "corruptions", "io_faults", "manifest_resets"):
                out[k] = self._index.stats[k]
            out.update(self._index.stats)
        return out

    def bytes_moved(self) -> tuple[int, int]:
        """(bytes read, bytes written) so far: two counters, cheap enough for every step."""
        with self._index.lock:
            return self._index.stats["read_bytes"], self._index.stats["write_bytes"]

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

    def _drop(self, key: bytes, e: Entry) -> None:
        """Forget a block; its slot is reusable once the row is gone and no read holds it."""
        self._startup_entries = None
        if self._index.detach(key, e):
            self._forget_rows([(key, e)])

    def _report_drops(self, keys: list[bytes]) -> None:
        """Tell the owner (``on_drop``) which blocks the tier forgot on its own. No lock is held.
        A key written again since (live once more) is left out."""
        if self._on_drop is None:
            return
        keys = [k for k in keys if self._index.live(k) is None]
        if not keys:
            return
        try:
            self._on_drop(keys)
        except Exception as err:  # noqa: BLE001 - the owner's bug must not stop the tier
            self._index.count("on_drop_errors")
            if self._index.first("on_drop"):
                log.warning("kvplug SSD tier: on_drop callback failed: %r (counted; later ones are not logged)", err)

    def _fault(self, op: str, err: Exception) -> None:
        kind = f"{op}_{errno.errorcode.get(getattr(err, 'errno', None) or 0, type(err).__name__)}"
        self._index.count("io_faults")
        self._index.count(f"io_faults_{kind}")
        if self._index.first(kind):
            log.warning("kvplug SSD tier: %s fault in %s: %s (counted in stats; later ones are not logged)",
                        kind, self.path, err)
