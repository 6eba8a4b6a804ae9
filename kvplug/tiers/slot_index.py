"""The SSD tier's in-memory state: which key is in which slot, and what may move.

One lock guards it all: the key -> slot map in least-recently-used order,
the free slots, read pins, writes in flight, access times not yet persisted
and the counters. No I/O happens here; the tier sequences that against the
manifest (a slot comes back to ``free`` only once no committed row names it).
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass


@dataclass(slots=True)
class Entry:
    slot: int              # global slot number
    checksum: int
    foreign: bool = False  # stored under another fingerprint/format: kept, never served
    pins: int = 0          # reads in flight; a pinned slot is never evicted or reused
    dropped: bool = False  # row deleted (committed); the slot is freed at the last unpin
    tag: bytes | None = None  # with an integrity key: the digest of its key, parent and tokens (its MAC binds it)


class SlotIndex:
    def __init__(self, num_slots: int, entries: list[tuple[bytes, Entry]], clock: int,
                 reserved: set[int] = frozenset()) -> None:
        """``entries`` oldest access first; every other slot starts free but ``reserved`` ones
        (named by rows that could not be deleted: never reused in this run)."""
        self.lock = threading.Lock()
        self.stats: Counter[str] = Counter()
        self._map: OrderedDict[bytes, Entry] = OrderedDict(entries)
        used = {e.slot for _, e in entries} | set(reserved)
        self._free = [g for g in range(num_slots - 1, -1, -1) if g not in used]  # pop() -> slot 0 first
        self._pending: dict[bytes, cf.Future] = {}  # writes queued or in flight
        self._touched: dict[bytes, int] = {}        # access times not yet in the manifest
        self._clock = clock
        self._logged: set[str] = set()

    # -- lookups ----------------------------------------------------------------

    def live(self, key: bytes) -> Entry | None:
        with self.lock:
            e = self._map.get(key)
            return None if e is None or e.foreign else e

    def keys(self) -> set[bytes]:
        with self.lock:
            return {k for k, e in self._map.items() if not e.foreign}

    def counts(self) -> tuple[int, int, int]:
        """(own blocks, foreign blocks, writes in flight)."""
        with self.lock:
            foreign = sum(e.foreign for e in self._map.values())
            return len(self._map) - foreign, foreign, len(self._pending)

    # -- writes -----------------------------------------------------------------

    def begin_write(self, key: bytes) -> tuple[cf.Future, bool]:
        """(future, new): new is False when the key is stored (done, True) or on its way."""
        with self.lock:
            e = self._map.get(key)
            if e is not None and not e.foreign:
                self._touch(key)
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
                self._map[key] = entry
                self._map.move_to_end(key)
            elif slot is not None:
                self._free.append(slot)
            return self._pending.pop(key)

    def pending(self) -> list[cf.Future]:
        with self.lock:
            return list(self._pending.values())

    def take_free(self, n: int) -> tuple[list[int], list[tuple[bytes, Entry]]]:
        """Up to n free slots, and the LRU unpinned blocks to evict for the rest
        (out of the map already: nothing can pin them any more)."""
        with self.lock:
            k = min(n, len(self._free))
            slots = self._free[len(self._free) - k:]
            del self._free[len(self._free) - k:]
            victims = []
            if k < n:
                for key, e in self._map.items():
                    if e.pins == 0:
                        victims.append(key)
                        if k + len(victims) == n:
                            break
            for key in victims:
                self._touched.pop(key, None)
            return slots, [(key, self._map.pop(key)) for key in victims]

    def give_back(self, slots: list[int]) -> None:
        with self.lock:
            self._free.extend(slots)

    # -- reads, drops -----------------------------------------------------------

    def pin(self, key: bytes) -> Entry | None:
        with self.lock:
            e = self._map.get(key)
            if e is None or e.foreign:
                return None
            e.pins += 1
            self._touch(key)
            return e

    def unpin(self, e: Entry) -> None:
        with self.lock:
            e.pins -= 1
            if e.dropped and e.pins == 0:
                self._free.append(e.slot)

    def detach(self, key: bytes, e: Entry) -> bool:
        """Take a block out of the map (before deleting its row); False if gone already."""
        with self.lock:
            if self._map.get(key) is not e:
                return False
            del self._map[key]
            self._touched.pop(key, None)
            return True

    def dropped(self, e: Entry) -> None:
        """Its row is deleted: the slot is free once the last reader lets go."""
        with self.lock:
            e.dropped = True
            if e.pins == 0:
                self._free.append(e.slot)

    # -- access times, counters -------------------------------------------------

    def _touch(self, key: bytes) -> None:
        self._map.move_to_end(key)
        self._clock += 1
        self._touched[key] = self._clock

    def take_touches(self) -> tuple[list[tuple[int, bytes]], int]:
        """(access times to persist, a fresh access time for the rows being written)."""
        with self.lock:
            touches = [(t, k) for k, t in self._touched.items()]
            self._touched.clear()
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
