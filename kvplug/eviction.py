"""Eviction policies for the CPU tier: which unpinned blocks leave first.

A policy only orders keys; the store owns the blocks and the pins. It holds
the keys of blocks that may be evicted (stored, visible, in a CPU slot),
hears about accesses (``touch``) and, asked for victims, hands back unpinned
keys and forgets them. A pinned key is never handed out.

- ``LRU``: least recently used first. O(1) per operation (an OrderedDict).
- ``S3FIFO``: Yang et al., SOSP'23. A small FIFO (10%) filters one-hit
  wonders, a main FIFO with 2-bit access counts keeps what is reused, and a
  ghost FIFO of recently evicted keys sends a returning key straight to main.
  Scan-resistant where LRU is not: one long prompt does not flush the cache.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Protocol

IsPinned = Callable[[bytes], bool]


class EvictionPolicy(Protocol):
    def __len__(self) -> int: ...
    def __contains__(self, key: bytes) -> bool: ...
    def insert(self, key: bytes) -> None: ...
    def touch(self, key: bytes) -> None: ...
    def remove(self, key: bytes) -> None: ...
    def evict(self, n: int, is_pinned: IsPinned) -> list[bytes]:
        """Up to ``n`` unpinned keys, in eviction order, now forgotten by the policy."""
        ...


class LRU:
    def __init__(self, capacity: int = 0):  # capacity: same signature as S3FIFO
        self._order: OrderedDict[bytes, None] = OrderedDict()  # oldest first

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: bytes) -> bool:
        return key in self._order

    def insert(self, key: bytes) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: bytes) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: bytes) -> None:
        self._order.pop(key, None)

    def evict(self, n: int, is_pinned: IsPinned) -> list[bytes]:
        victims = []
        for key in self._order:  # O(pinned + n): pins are few and short-lived
            if len(victims) == n:
                break
            if not is_pinned(key):
                victims.append(key)
        for key in victims:
            del self._order[key]
        return victims


class S3FIFO:
    MAX_FREQ = 3

    def __init__(self, capacity: int, small_ratio: float = 0.1):
        self._small: OrderedDict[bytes, int] = OrderedDict()  # key -> access count, oldest first
        self._main: OrderedDict[bytes, int] = OrderedDict()
        self._ghost: OrderedDict[bytes, None] = OrderedDict()
        self._small_target = max(1, int(capacity * small_ratio))
        self._ghost_limit = max(1, capacity)

    def __len__(self) -> int:
        return len(self._small) + len(self._main)

    def __contains__(self, key: bytes) -> bool:
        return key in self._small or key in self._main

    def insert(self, key: bytes) -> None:
        if key in self:
            return self.touch(key)
        if key in self._ghost:  # evicted recently and back already: it earned main
            del self._ghost[key]
            self._main[key] = 0
        else:
            self._small[key] = 0

    def touch(self, key: bytes) -> None:
        for fifo in (self._small, self._main):
            if key in fifo:
                fifo[key] = min(fifo[key] + 1, self.MAX_FREQ)

    def remove(self, key: bytes) -> None:
        self._small.pop(key, None)
        self._main.pop(key, None)

    def evict(self, n: int, is_pinned: IsPinned) -> list[bytes]:
        victims: list[bytes] = []
        # A key moves on (instead of leaving) at most MAX_FREQ + 1 times unless
        # pinned; these bounds only stop a (nearly) all-pinned cache spinning.
        steps = (self.MAX_FREQ + 2) * len(self) + n
        main_spins = 0  # main steps since main last gave a victim
        while len(victims) < n and len(self) and steps:
            steps -= 1
            main_stuck = main_spins > (self.MAX_FREQ + 1) * len(self._main)
            if self._small and (len(self._small) >= self._small_target or not self._main or main_stuck):
                key, freq = self._small.popitem(last=False)
                if freq > 0 or is_pinned(key):  # reused (or in use): promote to main
                    self._main[key] = 0
                    continue
                self._remember(key)
            elif self._main:
                key, freq = self._main.popitem(last=False)
                if freq > 0 or is_pinned(key):  # second chance, one access at a time
                    self._main[key] = max(freq - 1, 0)
                    main_spins += 1
                    continue
                main_spins = 0
            victims.append(key)
        return victims

    def _remember(self, key: bytes) -> None:
        self._ghost[key] = None
        if len(self._ghost) > self._ghost_limit:
            self._ghost.popitem(last=False)


def make_policy(name: str, capacity: int) -> EvictionPolicy:
    """The policy config.eviction names, for a tier of ``capacity`` blocks."""
    policies = {"lru": LRU, "s3fifo": S3FIFO}
    if name not in policies:
        raise ValueError(f"eviction={name!r} is not known; expected one of {sorted(policies)}")
    return policies[name](capacity)
