"""TieredStore: the one object connectors talk to.  (INTERFACE STUB — to be implemented)

Looks up, stores, loads and moves KV blocks between the CPU tier (a slab of
fixed-size slots, optionally in POSIX shared memory so a worker process maps
the same bytes) and the SSD tier (aligned segment files + SQLite manifest).

A block is every layer of one block of tokens, encoded by the codec,
layer-major; its bytes are ``block_bytes`` long and live in one CPU slot
(``slot_stride >= block_bytes``, 4096-aligned, room for the SSD header) and/or
one SSD slot.

Transfers are two-phase, as in vLLM's OffloadingManager:
  prepare_store -> (caller writes the slot bytes) -> complete_store | abort_store
  lookup -> prepare_load (pins; promotes SSD-only blocks into CPU slots in the
  background) -> (caller waits for the handle, reads the slot bytes) -> complete_load
Nothing half-written is ever found; nothing pinned is ever evicted.

Copy-on-write: stored blocks are immutable and shared by every request that
hits them; storing a key that exists is a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class BlockRef:
    key: bytes
    num_tokens: int      # tokens of this block the hit covers (<= block_tokens)
    tier: str            # "cpu" or "ssd": where the block is now
    slot: int | None     # CPU slot when tier == "cpu"


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


class LoadHandle:
    """Completion handle of a load: ``done()``, ``wait(timeout)``, ``slots`` per
    block once done, ``failed`` = indices of blocks that could not be read
    (corrupt / I/O error: they are dropped from the store and must be
    recomputed). Pins its blocks until ``TieredStore.complete_load``."""
