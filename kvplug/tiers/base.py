"""The interfaces the store sees its tiers through.

Every tier keeps blocks of ``block_bytes`` in slots of ``slot_stride`` bytes
(``slots.slot_stride``), reports ``stats()`` and can be ``close()``d.

The CPU tier is addressed by slot: the store owns keys, pins and eviction
there, because connectors copy straight into and out of its slots. A tier
below it (the SSD tier; later a remote one) is addressed by key, works
asynchronously, keeps its own map and evicts on its own: a ``BackingTier``.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Iterable, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Tier(Protocol):
    block_bytes: int
    slot_stride: int

    def stats(self) -> dict[str, int | float]: ...

    def close(self, timeout: float | None = None) -> None: ...


@runtime_checkable
class BackingTier(Tier, Protocol):
    def entries(self) -> Iterable[tuple[bytes, bytes, np.ndarray]]:
        """(key, parent, tokens) of every block it holds, to rebuild the index at start
        (an ``index_bulk.Blocks`` loads in bulk; with ``checked=False`` the index checks
        each block's chain at first use, and the store hands the ones that fail to the
        tier's ``reject(keys)``, which a tier handing out unchecked blocks must have)."""
        ...

    def contains(self, key: bytes) -> bool: ...

    def write(self, key: bytes, parent: bytes, tokens: np.ndarray, data) -> Future[bool]:
        """Store ``data`` (a CPU slot, kept unmodified until done). True = stored, or was already."""
        ...

    def read(self, key: bytes, out) -> Future[bool]:
        """Fill ``out`` (a CPU slot). False = miss: absent, corrupt or I/O error (then dropped)."""
        ...

    def delete(self, key: bytes) -> None: ...

    def delete_all(self) -> None:
        """Drop every block stored under this tier's fingerprint (a cache reset)."""
        ...

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for the writes in flight; False if some are still in flight after ``timeout``."""
        ...
