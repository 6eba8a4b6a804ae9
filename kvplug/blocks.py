"""The values that cross the store's interface: block refs, hits, store entries, load handles."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np

from kvplug.keys import block_key, tokens_array


class BlockRef(NamedTuple):
    """One block of a hit (a tuple: lookups make thousands a second)."""

    key: bytes
    num_tokens: int      # tokens of this block the hit covers (<= block_tokens)
    tier: str            # "cpu" or "ssd": where the block is now
    slot: int | None     # CPU slot when tier == "cpu" (in a LoadHandle: the slot it is read into)


@dataclass
class Hit:
    num_tokens: int = 0
    blocks: list[BlockRef] = field(default_factory=list)

    def count(self, tier: str) -> int:
        return sum(1 for b in self.blocks if b.tier == tier)


@dataclass(frozen=True)
class StoreEntry:
    key: bytes
    parent: bytes
    tokens: np.ndarray   # int64 token ids of this block (len <= block_tokens)

    @classmethod
    def of(cls, parent: bytes, tokens: Sequence[int] | np.ndarray) -> "StoreEntry":
        tokens = tokens_array(tokens)
        return cls(block_key(parent, tokens), parent, tokens)


class LoadHandle:
    """Completion handle of a load.

    ``blocks``: one ref per block asked for, with the CPU slot it is (being)
    read into. Once ``done()``: ``loadable`` is the prefix of them whose bytes
    are in their slots, ``num_tokens`` its tokens, ``failed`` the indices of
    the rest: the first block that could not be read (gone, corrupt, I/O
    error, no slot free) and every block after it, since a prefix must be
    contiguous. Pins its blocks until ``TieredStore.complete_load``.
    """

    def __init__(self) -> None:
        self.blocks: list[BlockRef] = []
        self._pinned: list[bytes] = []
        self._reading = 0
        self._first_failed: int | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.done_at = 0.0  # when the last read landed (time.monotonic)
        self.first_at = 0.0  # when the first read landed (a good one): a promotion's progress

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def loadable(self) -> list[BlockRef]:
        return self.blocks[: self._first_failed]

    @property
    def failed(self) -> list[int]:
        return list(range(len(self.loadable), len(self.blocks)))

    @property
    def slots(self) -> list[int]:
        return [b.slot for b in self.loadable]

    @property
    def num_tokens(self) -> int:
        return sum(b.num_tokens for b in self.loadable)

    @property
    def num_tokens_asked(self) -> int:
        """Tokens of every block asked for, readable or not (known before the reads end)."""
        return sum(b.num_tokens for b in self.blocks)

    def _add(self, ref: BlockRef, reading: bool) -> None:
        self.blocks.append(ref)
        self._pinned.append(ref.key)
        self._reading += reading

    def _prepared(self, refs: Sequence[BlockRef]) -> None:
        """Close the list: refs that could not even be pinned fail at once."""
        with self._lock:
            if len(self.blocks) < len(refs):
                self._first_failed = len(self.blocks)
                self.blocks += [BlockRef(r.key, r.num_tokens, r.tier, None) for r in refs[len(self.blocks):]]
            if self._reading == 0:
                self.done_at = time.monotonic()
                self._done.set()

    def _read_done(self, i: int, ok: bool) -> None:
        with self._lock:
            if not ok and (self._first_failed is None or i < self._first_failed):
                self._first_failed = i
            self._reading -= 1
            if ok and not self.first_at:  # a failed read is no progress
                self.first_at = time.monotonic()
            if self._reading == 0:
                self.done_at = time.monotonic()
                self._done.set()
