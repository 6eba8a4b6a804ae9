"""TieredStore: the one object connectors talk to.

Looks up, stores, loads and moves KV blocks (``block_bytes`` each: every
layer of one block of tokens, encoded) between the CPU tier (a slab of slots,
maybe in shared memory a worker maps), the SSD tier and a remote one (store_remote.py).

Transfers are two-phase, as in vLLM's OffloadingManager:
  prepare_store -> (caller fills the slots) -> complete_store | abort_store
  lookup -> prepare_load (pins; SSD-only blocks are read into CPU slots in the
  background) -> (caller waits for the handle, reads the slots) -> complete_load
Nothing half-written is ever found; nothing pinned is ever evicted. Stored
blocks are immutable and shared (copy-on-write): storing one that exists is a no-op.

State, under one lock (SSD futures complete on I/O threads):
  _index     what a lookup may find: blocks visible in a CPU slot or on SSD
  _resident  blocks holding a CPU slot, each a ``Resident`` whose state
             (storing, promoting, visible, evicted: kvplug/block_state.py)
             only moves along checked transitions
  _policy    the visible resident blocks that may be evicted
The SSD tier's own map says what it holds; what it drops it reports (on_drop).
What a block's phase needs (a storing block's tokens, the loads waiting for a
promotion, an SSD write in flight) lives on its ``Resident``, not in more maps.
A block's pins are its loads in flight plus an SSD transfer of its slot.
SSD calls and byte copies happen outside the lock.

Lookups walk from a root (``root=``, default the store's fingerprint): the
connector passes a per-request root that holds the request's identity and the
store's ``epoch``; ``reset`` moves to a new epoch (recorded in the SSD
directory) and drops every block, so nothing stored before is loaded after.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections import Counter
from functools import partial
from typing import Callable, Sequence

import numpy as np

from kvplug import epoch, index_bulk
from kvplug.block_state import BlockState, IllegalTransition, Resident
from kvplug.blocks import BlockRef, Hit, LoadHandle, StoreEntry  # noqa: F401  (re-exported)
from kvplug.config import KVPlugConfig
from kvplug.eviction import make_policy
from kvplug.index import PrefixIndex
from kvplug.keys import tokens_array
from kvplug.layout import KVLayout
from kvplug.store_counters import StoreCounters
from kvplug.store_remote import RemoteTransfers
from kvplug.store_ssd import SSDTransfers
from kvplug.tiers.base import BackingTier
from kvplug.tiers import slot_header
from kvplug.tiers.cpu import CPUTier
from kvplug.tiers.ssd import CLOSE_TIMEOUT_S, SSDTier

log = logging.getLogger("kvplug")


class TieredStore(SSDTransfers, RemoteTransfers):
    def __init__(self, config: KVPlugConfig, layout: KVLayout, block_bytes: int, fingerprint: bytes,
                 name: str | None = None, *, ssd: BackingTier | None = None, events: bool = False):
        """``name``: the shared-memory slab's name (a unique one is made if None);
        ``ssd``: a ready backing tier instead of the one ``config.ssd_path`` describes;
        ``events``: record which blocks enter and leave the CPU tier (``take_events``)."""
        self.config = config
        self.root = fingerprint
        self.block_tokens = layout.block_tokens
        self.block_bytes = block_bytes
        if config.shared_memory:
            name = name or f"kvplug-{os.getpid()}-{secrets.token_hex(4)}"
            CPUTier.sweep_dead(config.shm_dir)  # slabs of engines killed before removing theirs
        # A shared slab is pinned by the worker that attaches it, where the GPU copies happen.
        self.cpu = CPUTier.create(config.cpu_bytes, block_bytes, name if config.shared_memory else None,
                                  config.shm_dir, pin=not config.shared_memory)
        # What the SSD tier's on_drop touches exists before the tier (it reports start-up drops).
        self._lock = threading.Lock()
        self._index = PrefixIndex(fingerprint, layout.block_tokens)
        self._resident: dict[bytes, Resident] = {}
        if ssd is None and config.ssd_path:
            try:
                ssd = SSDTier(config.ssd_path, config.ssd_bytes, block_bytes, fingerprint,
                              io_threads=config.io_threads, o_direct=config.o_direct,
                              block_tokens=layout.block_tokens, integrity_key=config.integrity_secret(),
                              on_drop=self._ssd_dropped)
            except BaseException:
                self.cpu.close()  # leave no slab behind in /dev/shm
                self.cpu.unlink()
                raise
        self.ssd = ssd
        self._policy = make_policy(config.eviction, self.cpu.num_slots)
        self._writes = self._reads = 0                    # SSD transfers queued or in flight
        self._stats = StoreCounters(self.block_tokens, ssd=self.ssd is not None)
        self._events: list[tuple[bool, bytes]] | None = [] if events else None  # (entered?, key)
        self._idle = threading.Condition(self._lock)      # SSD transfers finished
        self._closed = False
        self._epoch_key = None if self.ssd is None or not config.integrity_key else \
            slot_header.derive_key(config.integrity_secret())
        self.epoch = epoch.load(config.ssd_path if ssd is not None else None, self._epoch_key)
        if self.epoch is None:  # unreadable, or failed its MAC: a new epoch, written (signed) at once
            self.epoch = epoch.advance(config.ssd_path, self._epoch_key)
        self._init_remote(config, fingerprint, block_bytes)  # store_remote.py: the shared Valkey/Redis tier
        if ssd is not None:
            index_bulk.load_all(self._index, ssd.entries)

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            return key in self._index

    # -- lookup -----------------------------------------------------------------

    def lookup(self, tokens: Sequence[int] | np.ndarray, root: bytes | None = None) -> Hit:
        """The longest prefix of ``tokens`` stored under ``root`` (default: the store's
        fingerprint), block by block, with each block's tier. Pins nothing."""
        tokens = tokens_array(tokens)
        bt, refs, hit_tokens, new = self.block_tokens, [], 0, tuple.__new__  # new: BlockRef without its Python __new__
        with self._lock:
            get = self._resident.get
            for key, n in self._index.match(tokens, root):
                block = get(key)
                if block is None:  # the SSD tier tells the store what it drops; a drop racing
                    ref = new(BlockRef, (key, n, "ssd", None))  # this lookup ends the hit at prepare_load
                elif block.visible:
                    ref = block.ref
                    if ref is None or n != bt:
                        ref = BlockRef(key, n, "cpu", block.slot)
                        if n == bt:
                            block.ref = ref
                else:
                    ref = new(BlockRef, (key, n, "ssd", None))
                refs.append(ref)
                hit_tokens += n
            hit = Hit(hit_tokens, refs)
            self._stats.count_lookup(len(tokens), hit)
            bad, self._index.bad = self._index.bad, []
        if bad:  # manifest rows that do not chain, found at their first lookup (index_check.py)
            self.ssd.reject(bad)  # only a tier's unchecked entries can fail: it drops and counts them
        return hit

    # -- store ------------------------------------------------------------------

    def prepare_store(self, entries: Sequence[StoreEntry]) -> list[int | None]:
        """A reserved CPU slot per entry for the caller to fill; None where the
        key is stored already (copy-on-write: nothing to do) or no slot could
        be freed (everything pinned)."""
        for entry in entries:
            if not 0 < len(entry.tokens) <= self.block_tokens:
                raise ValueError(f"a block holds 1..{self.block_tokens} tokens, got {len(entry.tokens)}")
        slots: list[int | None] = [None] * len(entries)
        jobs: list[Callable[[], None]] = []
        with self._lock:
            index, resident, new = self._index, self._resident, {}
            for i, entry in enumerate(entries):
                if entry.key in index or entry.key in resident or entry.key in new:
                    self._stats["store_skipped_existing"] += 1
                else:
                    new[entry.key] = i
            free = self._take_slots(len(new), jobs)
            self._stats["store_no_slot"] += len(new) - len(free)
            for (key, i), slot in zip(new.items(), free):
                resident[key] = Resident(slot, BlockState.STORING, entry=entries[i])
                slots[i] = slot
        self._run(jobs)
        return slots

    def complete_store(self, keys: Sequence[bytes]) -> None:
        """The slots' bytes are written: the blocks become visible (and, write-through, go to SSD)."""
        jobs: list[Callable[[], None]] = []
        with self._lock:
            for key in keys:
                block = self._resident.get(key)
                if block is None or block.state is not BlockState.STORING:
                    continue
                entry, block.entry = block.entry, None
                block.move(BlockState.VISIBLE)
                if self._events is not None:
                    self._events.append((True, key))
                self._index.insert(key, entry.parent, entry.tokens)
                self._policy.insert(key)
                self._stats["stored_blocks"] += 1
                if self.ssd is not None and self.config.ssd_write == "through":
                    self._queue_write(key, jobs)
                self._remote_stored(key, jobs)
        self._run(jobs)

    def abort_store(self, keys: Sequence[bytes]) -> None:
        """Give back the slots of blocks that will not be written."""
        with self._lock:
            for key in keys:
                block = self._resident.get(key)
                if block is not None and block.state is BlockState.STORING:
                    self._release(key)

    def put(self, parent: bytes, tokens: Sequence[int] | np.ndarray, data) -> bool:
        """Store one block's bytes synchronously; True when it is stored now (or already was)."""
        entry = StoreEntry.of(parent, tokens)
        (slot,) = self.prepare_store([entry])
        if slot is None:
            return entry.key in self
        try:
            self.cpu.write_block(slot, data)
        except BaseException:
            self.abort_store([entry.key])
            raise
        self.complete_store([entry.key])
        return True

    # -- load -------------------------------------------------------------------

    def prepare_load(self, hit: Hit | Sequence[BlockRef]) -> LoadHandle:
        """Pin the blocks of a hit; CPU blocks are ready at once, SSD-only ones are
        read into fresh CPU slots (promoted) in the background."""
        refs = list(hit.blocks if isinstance(hit, Hit) else hit)
        handle = LoadHandle()
        jobs: list[Callable[[], None]] = []
        with self._lock:
            resident, touch = self._resident, self._policy.touch
            for i, ref in enumerate(refs):
                block = resident.get(ref.key)
                if block is not None and block.visible:  # the hot path: a CPU hit
                    block.pin()
                    touch(ref.key)
                    handle.blocks.append(ref if ref.slot == block.slot and ref.tier == "cpu"
                                         else BlockRef(ref.key, ref.num_tokens, "cpu", block.slot))
                    handle._pinned.append(ref.key)
                elif block is not None and block.state is BlockState.PROMOTING:  # another load promotes it
                    block.pin()
                    block.waiting.append((handle, i))
                    handle._add(BlockRef(ref.key, ref.num_tokens, "ssd", block.slot), reading=True)
                elif block is None and self._on_ssd(ref.key) and (slot := self._take_slot(jobs)) is not None:
                    # pinned by this load and by the read
                    self._resident[ref.key] = Resident(slot, BlockState.PROMOTING, pins=2, waiting=[(handle, i)])
                    self._reads += 1
                    jobs.append(partial(self._submit, self.ssd.read, (ref.key, self.cpu.slot_view(slot)),
                                        partial(self._read_done, ref.key)))
                    handle._add(BlockRef(ref.key, ref.num_tokens, "ssd", slot), reading=True)
                else:
                    self._stats["load_misses"] += 1
                    if block is None and not self._on_ssd(ref.key):
                        self._forget_ssd_copy(ref.key)  # a drop the tier has not reported yet
                    break  # gone since the lookup, or no slot: the hit ends here
            self._stats["loads"] += 1
            handle._prepared(refs)  # under the lock: no read can report before the list is closed
        self._run(jobs)
        return handle

    def complete_load(self, handle: LoadHandle) -> None:
        """The caller is done with the slots: unpin the blocks."""
        with self._lock:
            for key in handle._pinned:
                self._unpin(key)
            handle._pinned = []

    def get(self, tokens: Sequence[int] | np.ndarray, root: bytes | None = None) -> tuple[int, list[bytes]]:
        """Synchronous load of the longest stored prefix: (tokens, each block's bytes)."""
        handle = self.prepare_load(self.lookup(tokens, root))
        handle.wait()
        try:
            return handle.num_tokens, [self.cpu.block_view(s).numpy().tobytes() for s in handle.slots]
        finally:
            self.complete_load(handle)

    # -- slots, eviction, pins (caller holds the lock) ---------------------------

    def _take_slot(self, jobs: list) -> int | None:
        slots = self._take_slots(1, jobs)
        return slots[0] if slots else None

    def _take_slots(self, n: int, jobs: list) -> list[int]:
        """Up to n free CPU slots, evicting as many unpinned blocks by policy as are missing.

        A victim not on SSD yet holds its slot until written back: that slot
        comes too late for this caller (who never waits) and goes to a later
        one. Evicting no more than asked keeps hot blocks in the CPU tier.
        """
        allocate, slots = self.cpu.allocate, []
        while len(slots) < n and (slot := allocate()) is not None:
            slots.append(slot)
        if len(slots) < n:
            for key in self._policy.evict(n - len(slots), self._is_pinned):
                if self._evict(key, jobs) and (slot := allocate()) is not None:
                    slots.append(slot)
        return slots

    def _is_pinned(self, key: bytes) -> bool:
        return self._resident[key].pins > 0

    def _evict(self, key: bytes, jobs: list) -> bool:
        """Take a block out of the CPU tier; True if its slot is free now.
        One not on SSD yet is written back first (unless the queue is full)."""
        self._stats["evictions"] += 1
        block = self._resident[key]
        if self.ssd is not None and not self.ssd.contains(key) and not block.writing:
            self._queue_write(key, jobs)  # pins the slot until written
        self._remote_evicted(key, jobs)
        self._leave_cpu(key, block)
        if block.pins == 0:
            self._release(key)
            return True
        return False

    def _unpin(self, key: bytes) -> None:
        if self._resident[key].unpin():
            self._release(key)

    def _leave_cpu(self, key: bytes, block: Resident) -> None:
        """A visible block leaves the CPU tier (its slot goes back at its last unpin)."""
        block.move(BlockState.EVICTING)
        self._policy.remove(key)

    def _release(self, key: bytes) -> None:
        """Give a block's CPU slot back; a block on no tier any more leaves the index."""
        block = self._resident[key]
        if not block.releasable():
            raise IllegalTransition(f"kvplug store: the slot of a {block.state.value} block given back")
        del self._resident[key]
        if self._events is not None and block.state is BlockState.EVICTING:
            self._events.append((False, key))
        self.cpu.free(block.slot)
        if not self._on_ssd(key):
            self._index.remove(key)

    # -- reset ------------------------------------------------------------------------

    def reset(self) -> None:
        """A new epoch (recorded before anything else changes), then every block dropped:
        nothing stored before the reset is loaded after it, in this process or after a
        restart. Blocks pinned by loads in flight keep their slots until unpinned; saves
        in flight complete under old-epoch roots, which no lookup walks any more."""
        new_epoch = epoch.advance(self.config.ssd_path if self.ssd is not None else None, self._epoch_key)
        with self._lock:
            self.epoch = new_epoch
            for key, block in list(self._resident.items()):
                if block.visible:
                    self._leave_cpu(key, block)
                    if block.pins == 0:
                        self._release(key)
            self._remote_origin.clear()
            self._index = PrefixIndex(self.root, self.block_tokens)
            self._stats["resets"] += 1
        if self.ssd is not None:
            self.ssd.delete_all()

    # -- stats and lifetime ---------------------------------------------------------

    def stats(self) -> dict[str, dict[str, int | float]]:
        """Counters by section: "cpu" and "ssd" (hits/misses in blocks and tokens,
        plus each tier's own figures) and "store" (lookups, evictions, SSD
        write-backs queued/done/failed/dropped, promotions, ...)."""
        with self._lock:
            counts = Counter(self._stats)
            cpu_blocks = sum(b.visible for b in self._resident.values())
            pinned = sum(b.pins > 0 for b in self._resident.values())
            writing = self._writes
        out = StoreCounters.report(counts, self.cpu.stats(), None if self.ssd is None else self.ssd.stats(),
                                   cpu_blocks=cpu_blocks, block_bytes=self.block_bytes, pinned=pinned,
                                   writing=writing)
        return out if self.remote is None else out | {"remote": self.remote_stats()}

    def take_events(self) -> list[tuple[bool, bytes]]:
        """(True, key) for each block that became readable in the CPU tier since the
        last call, (False, key) for each that left it, in order (with ``events``)."""
        with self._lock:
            if not self._events:
                return []
            events, self._events = self._events, []
        return events

    def close(self) -> None:
        """Finish SSD transfers (a hung disk gets ``CLOSE_TIMEOUT_S``), close the tiers, remove
        the shared-memory slab. Always returns."""
        if self._closed:
            return
        self._closed = True
        if not self.flush(CLOSE_TIMEOUT_S):
            log.warning("kvplug store: SSD writes still in flight at close; left behind")
        self._close_remote(CLOSE_TIMEOUT_S)
        with self._idle:
            self._idle.wait_for(lambda: not self._reads, CLOSE_TIMEOUT_S)
        if self.ssd is not None:
            self.ssd.close(CLOSE_TIMEOUT_S)
        self.cpu.close()
        self.cpu.unlink()

    def __enter__(self) -> "TieredStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
