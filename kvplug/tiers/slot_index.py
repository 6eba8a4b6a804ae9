"""The SSD tier's in-memory state: which key is in which slot, and what may move.

One lock guards it all. No I/O happens here; the tier sequences that against
the manifest (a slot comes back to ``free`` only once no committed row names it).

Compact, because a large tier holds millions of blocks: nothing is a Python
object per slot. Per slot of capacity (about 50 bytes; bench/scale.py):
  _keys      its key and the key -> slot table (kvplug/key_table.py)
  _state     FREE, LIVE, FOREIGN (stored under another fingerprint or
             format: kept, never served, evicted first), DROPPED (row
             deleted, reads still hold it: free at the last unpin), HELD
             (taken by a write in flight, or named by a row that could not
             be deleted: never reused in this run)
  _checksum  the block bytes' xxh3_64; _pins: reads in flight (a pinned slot
             is never evicted or reused); _clock: last access (LRU; foreign
             blocks -1); _dirty: access time not yet in the manifest
  _tags      with an integrity key: 32 bytes a slot, the digest of its key,
             parent and tokens (its MAC binds it)
Free slots are a stack; victims are the least recently used unpinned blocks,
picked in one vectorised pass when the stack runs dry.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from array import array
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from kvplug.key_table import KeyTable

FREE, LIVE, FOREIGN, DROPPED, HELD = range(5)
TAG_BYTES = 32  # slot_header.meta_digest


@dataclass(slots=True, frozen=True)
class Entry:
    """A handle on a live block (made on demand: the state lives in the arrays)."""
    slot: int              # global slot number
    checksum: int
    tag: bytes | None = None


class SlotIndex:
    def __init__(self, num_slots: int, clock: int = 0, tags: bool = False) -> None:
        self.lock = threading.Lock()
        self.stats: Counter[str] = Counter()
        self._keys = KeyTable(num_slots)
        self._state = bytearray(num_slots)
        self._checksum = array("q", bytes(8 * num_slots))
        self._clock_of = array("q", bytes(8 * num_slots))
        self._pins = array("i", bytes(4 * num_slots))
        self._dirty = bytearray(num_slots)
        self._tags = bytearray(TAG_BYTES * num_slots) if tags else None
        self._free = array("i")        # filled by ready(): pop() -> lowest slot first
        self._own = self._foreign = 0
        self._pending: dict[bytes, cf.Future] = {}  # writes queued or in flight
        self._clock = clock
        self._logged: set[str] = set()

    # -- start-up ---------------------------------------------------------------

    def load(self, keys: bytes, hashes: np.ndarray, slots: np.ndarray, checksums: np.ndarray,
             foreign: np.ndarray, clocks: np.ndarray, tags: list[tuple[int, bytes]] = ()) -> None:
        """The blocks the manifest holds, at start-up, as columns (``keys`` end to end,
        distinct, with their ``hash(key) & 0xFFFFFFFF``; distinct slots; ``tags``: (slot,
        tag) of the blocks that have one); then ``ready``."""
        g = np.asarray(slots, np.int64)
        self._keys.fill(keys, g, hashes)
        alien = np.asarray(foreign, bool)
        np.frombuffer(self._state, np.uint8)[g] = np.where(alien, FOREIGN, LIVE)
        np.frombuffer(self._checksum, np.int64)[g] = checksums
        np.frombuffer(self._clock_of, np.int64)[g] = np.where(alien, -1, clocks)
        self._foreign = int(alien.sum())
        self._own = len(g) - self._foreign
        for slot, tag in tags:
            if self._tags is not None:
                self._set_tag(slot, tag)

    def hold(self, slots: Iterable[int]) -> None:
        """Slots named by rows that could not be deleted: never reused in this run."""
        for g in slots:
            if self._state[g] == FREE:
                self._state[g] = HELD

    def ready(self) -> None:
        free = np.flatnonzero(np.frombuffer(self._state, np.uint8) == FREE)[::-1].astype(np.int32)
        self._free = array("i", free.tobytes())

    # -- lookups ----------------------------------------------------------------

    def _set_tag(self, g: int, tag: bytes) -> None:
        if len(tag) != TAG_BYTES:  # a slice assignment of another length would shift every later tag
            raise ValueError(f"a tag is {TAG_BYTES} bytes, got {len(tag)}")
        self._tags[g * TAG_BYTES:(g + 1) * TAG_BYTES] = tag

    def _entry(self, g: int) -> Entry:
        tag = None if self._tags is None else bytes(self._tags[g * TAG_BYTES:(g + 1) * TAG_BYTES])
        return Entry(g, self._checksum[g], tag)

    def _live_slot(self, key: bytes) -> int:
        g = self._keys.find(key)
        return g if g >= 0 and self._state[g] == LIVE else -1

    def live(self, key: bytes) -> Entry | None:
        with self.lock:
            g = self._live_slot(key)
            return None if g < 0 else self._entry(g)

    def contains(self, key: bytes) -> bool:
        with self.lock:
            return self._live_slot(key) >= 0

    def live_keys(self) -> list[bytes]:
        with self.lock:
            return [self._keys.key(int(g)) for g in np.flatnonzero(np.frombuffer(self._state, np.uint8) == LIVE)]

    def read_pins(self) -> int:
        with self.lock:
            return int(np.frombuffer(self._pins, np.int32).sum())

    def counts(self) -> tuple[int, int, int]:
        """(own blocks, foreign blocks, writes in flight)."""
        with self.lock:
            return self._own, self._foreign, len(self._pending)

    # -- writes -----------------------------------------------------------------

    def begin_write(self, key: bytes) -> tuple[cf.Future, bool]:
        """(future, new): new is False when the key is stored (done, True) or on its way."""
        with self.lock:
            g = self._live_slot(key)
            if g >= 0:
                self._touch(g)
                fut: cf.Future = cf.Future()
                fut.set_result(True)
                return fut, False
            if key in self._pending:
                return self._pending[key], False
            fut = self._pending[key] = cf.Future()
            return fut, True

    def end_write(self, key: bytes, entry: Entry | None, slot: int | None) -> cf.Future:
        """Publish a committed block (entry), or give its slot back (no committed row names it)."""
        with self.lock:
            if entry is not None:
                g = entry.slot
                old = self._keys.find(key)
                if old >= 0:  # a foreign copy of the same key: its row was replaced, its slot is free
                    self._forget(key, old)
                    self._state[old] = FREE
                    self._free.append(old)
                self._keys.put(key, g)
                self._state[g] = LIVE
                self._own += 1
                self._checksum[g] = entry.checksum
                if entry.tag is not None and self._tags is not None:
                    self._set_tag(g, entry.tag)
                self._touch(g)
            elif slot is not None:
                self._state[slot] = FREE
                self._free.append(slot)
            return self._pending.pop(key)

    def pending(self) -> list[cf.Future]:
        with self.lock:
            return list(self._pending.values())

    def take_free(self, n: int) -> tuple[list[int], list[tuple[bytes, Entry]]]:
        """Up to n free slots, and the LRU unpinned blocks to evict for the rest and a
        batch more (out of the map already: nothing can pin them any more). Every slot
        returned is HELD until ``end_write`` or ``give_back``."""
        with self.lock:
            k = min(n, len(self._free))
            slots = self._free[len(self._free) - k:].tolist()
            del self._free[len(self._free) - k:]
            victims = []
            if k < n:
                # One pass over every slot picks a batch (1/128 of the tier, at most 4096 blocks,
                # at least what is missing): a full tier pays the scan once per batch, not per write.
                want = max(n - k, min(4096, len(self._state) // 128))
                state = np.frombuffer(self._state, np.uint8)
                pins = np.frombuffer(self._pins, np.int32)
                cand = np.flatnonzero(((state == LIVE) | (state == FOREIGN)) & (pins == 0))
                if len(cand) > want:
                    clocks = np.frombuffer(self._clock_of, np.int64)[cand]
                    part = np.argpartition(clocks, want - 1)[:want]
                    cand = cand[part[np.argsort(clocks[part], kind="stable")]]
                del state, pins
                for g in cand.tolist():
                    key = self._keys.key(g)
                    victims.append((key, self._entry(g)))
                    self._forget(key, g)
            for g in slots + [e.slot for _, e in victims]:
                self._state[g] = HELD
            return slots, victims

    def give_back(self, slots: list[int]) -> None:
        with self.lock:
            for g in slots:
                self._state[g] = FREE
                self._free.append(g)

    # -- reads, drops -----------------------------------------------------------

    def pin(self, key: bytes) -> Entry | None:
        with self.lock:
            g = self._live_slot(key)
            if g < 0:
                return None
            self._pins[g] += 1
            self._touch(g)
            return self._entry(g)

    def unpin(self, e: Entry) -> None:
        with self.lock:
            g = e.slot
            if self._pins[g] <= 0:
                raise RuntimeError(f"kvplug SSD tier: slot {g} unpinned more often than pinned")
            self._pins[g] -= 1
            if self._pins[g] == 0 and self._state[g] == DROPPED:
                self._state[g] = FREE
                self._free.append(g)

    def detach(self, key: bytes, e: Entry) -> bool:
        """Take a block out of the map (before deleting its row); False if gone already."""
        with self.lock:
            if self._live_slot(key) != e.slot or self._checksum[e.slot] != e.checksum:
                return False  # gone already (or the slot holds a newer copy)
            self._forget(key, e.slot)
            self._state[e.slot] = HELD
            return True

    def detach_all(self) -> list[tuple[bytes, Entry]]:
        """Take every own block out of the map (before deleting their rows)."""
        with self.lock:
            out = []
            for g in np.flatnonzero(np.frombuffer(self._state, np.uint8) == LIVE).tolist():
                key = self._keys.key(g)
                out.append((key, self._entry(g)))
                self._forget(key, g)
                self._state[g] = HELD
            return out

    def dropped(self, e: Entry) -> None:
        """Its row is deleted: the slot is free once the last reader lets go."""
        with self.lock:
            g = e.slot
            if self._pins[g] == 0:
                self._state[g] = FREE
                self._free.append(g)
            else:
                self._state[g] = DROPPED

    def _forget(self, key: bytes, g: int) -> None:
        self._keys.pop(key)
        if self._state[g] == FOREIGN:
            self._foreign -= 1
        else:
            self._own -= 1
        self._dirty[g] = 0

    # -- access times, counters -------------------------------------------------

    def _touch(self, g: int) -> None:
        self._clock += 1
        self._clock_of[g] = self._clock
        self._dirty[g] = 1

    def take_touches(self) -> tuple[list[tuple[int, bytes]], int]:
        """(access times to persist, a fresh access time for the rows being written)."""
        with self.lock:
            dirty = np.frombuffer(self._dirty, np.uint8)
            slots = np.flatnonzero(dirty).tolist()
            dirty[slots] = 0
            del dirty
            touches = [(self._clock_of[g], self._keys.key(g)) for g in slots]
            self._clock += 1
            return touches, self._clock

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.stats[name] += n

    def first(self, kind: str) -> bool:
        """True the first time ``kind`` is seen: log each kind of trouble once."""
        with self.lock:
            seen = kind in self._logged
            self._logged.add(kind)
            return not seen
