"""Shared by the SSD tier tests: deterministic blocks and slot-like buffers."""

from __future__ import annotations

import numpy as np

from kvplug.keys import block_key
from kvplug.tiers.aligned_io import aligned_buffer
from kvplug.tiers.slots import slot_stride

FP = bytes(range(16))
BLOCK = 10_000          # deliberately not a multiple of 4096


def block(i: int, parent: bytes = FP, ntok: int = 4) -> tuple[bytes, bytes, np.ndarray]:
    """(key, parent, tokens) of the i-th test block."""
    tokens = np.arange(i * ntok, (i + 1) * ntok, dtype=np.int64)
    return block_key(parent, tokens), parent, tokens


def content(key: bytes, nbytes: int = BLOCK) -> np.ndarray:
    """The bytes a block with this key holds: derived from the key, so any process can check them."""
    return np.random.default_rng(int.from_bytes(key[:8], "little")).integers(0, 256, nbytes, dtype=np.uint8)


def slot(block_bytes: int = BLOCK, fill: np.ndarray | None = None) -> np.ndarray:
    """A 4096-aligned, slot_stride-long buffer, like a CPU-tier slot."""
    arr = np.asarray(aligned_buffer(slot_stride(block_bytes)))
    if fill is not None:
        arr[:len(fill)] = fill
    return arr
