"""Filling an empty PrefixIndex with many blocks at once: the store's start-up from an SSD manifest.

``PrefixIndex.insert`` costs a few microseconds a block, seconds for the
millions of blocks a large SSD tier holds. Here the same arrays are built in
a few vector operations: the keys, parents and token matrix by concatenation,
the hash table by the index's own vectorised ``_rehash``, and each block's
parent found by a sorted search over the keys' first 8 bytes (checked on all
16). Only fan-out points (a parent with several children) and chains whose
parent is not stored (``_loose``) take a Python step each, and there are few.
The result is what inserting the blocks one by one, in the given order,
would give.
"""

from __future__ import annotations

import ctypes
from array import array
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from kvplug.index import PrefixIndex
from kvplug.keys import KEY_BYTES

TRIM_ABOVE = 10_000  # blocks loaded at start-up before the freed heap is worth handing back


@dataclass
class Blocks:
    """Many (key, parent, tokens) blocks as columns: no Python object per block.
    ``checked``: every key is known to be the hash of its parent and tokens (else the
    index checks each block when a lookup first reaches it)."""
    keys: bytes            # n keys of KEY_BYTES, end to end
    parents: bytes         # n parent keys
    tokens: np.ndarray     # [n, width] int64, a row's tokens first, then zeros
    lengths: np.ndarray    # [n] int32: each block's token count
    hashes: np.ndarray | None = None  # [n] hash(key) & 0xFFFFFFFF, if known
    checked: bool = True

    @classmethod
    def of(cls, blocks: Sequence[tuple[bytes, bytes, Sequence[int] | np.ndarray]]) -> "Blocks | None":
        """Columns of (key, parent, tokens) tuples; None when some key or parent is not
        KEY_BYTES long or some block holds no tokens (those go one by one)."""
        n = len(blocks)
        keys, parents = b"".join(b[0] for b in blocks), b"".join(b[1] for b in blocks)
        lengths = np.fromiter((len(b[2]) for b in blocks), np.int32, n)
        if len(keys) != n * KEY_BYTES or len(parents) != n * KEY_BYTES or not n or lengths.min() < 1:
            return None
        tokens = np.zeros((n, int(lengths.max())), np.int64)
        for i, b in enumerate(blocks):
            tokens[i, :len(b[2])] = b[2]
        return cls(keys, parents, tokens, lengths)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[tuple[bytes, bytes, np.ndarray]]:
        for i, n in enumerate(self.lengths.tolist()):
            o = i * KEY_BYTES
            yield self.keys[o:o + KEY_BYTES], self.parents[o:o + KEY_BYTES], self.tokens[i, :n]


def load(index: PrefixIndex, blocks: Blocks | Sequence[tuple[bytes, bytes, np.ndarray]]) -> int:
    """Add (key, parent, tokens) blocks to ``index``; the blocks stored. An index that is
    not empty, or blocks that repeat a key, are inserted one by one instead."""
    if not len(blocks):
        return 0
    columns = blocks if isinstance(blocks, Blocks) else Blocks.of(blocks)
    if columns is None or len(index) or columns.tokens.shape[1] > index.block_tokens:
        return _one_by_one(index, blocks)
    n, bt, keys, parents = len(columns), index.block_tokens, columns.keys, columns.parents
    K = np.frombuffer(keys, np.uint8).reshape(n, KEY_BYTES)
    order = np.argsort(K[:, :8].copy().view(np.uint64).ravel(), kind="stable")
    k64 = K[order, :8].copy().view(np.uint64).ravel()
    if (k64[1:] == k64[:-1]).any():  # a repeated key (or 64-bit prefix): keep it simple
        return _one_by_one(index, blocks)
    tokens = columns.tokens
    wide = bool(tokens.min() < -(2**31) or tokens.max() >= 2**31)

    cap = 64
    while cap < n:
        cap *= 2
    index._tok = np.zeros((cap, bt), np.int64 if wide else np.int32)
    index._tok[:n, :tokens.shape[1]] = tokens
    index._wide = wide
    index._len = np.zeros(cap, np.int32)
    index._len[:n] = columns.lengths
    index._checked = bytearray(cap)
    if columns.checked:
        index._checked[:n] = b"\1" * n
    index._keys = bytearray(keys)
    index._parents = bytearray(parents)
    hashes = columns.hashes if columns.hashes is not None else key_hashes(keys)
    index._hash = array("I", hashes.astype(np.uint32).tobytes())
    index._count = n
    table = 16
    while table < 2 * n:
        table *= 2
    index._kids = array("i", bytes(4 * n))  # its length is the id high-water mark _rehash reads
    index._rehash(table)

    # Each block's parent id (-1: not stored), by a search over the sorted keys.
    P = np.frombuffer(parents, np.uint8).reshape(n, KEY_BYTES)
    p64 = P[:, :8].copy().view(np.uint64).ravel()
    at = np.minimum(np.searchsorted(k64, p64), n - 1)
    cand = order[at]
    pid = np.where((k64[at] == p64) & (K[cand] == P).all(axis=1), cand, -1).astype(np.int32)

    kids = np.full(n, -1, np.int32)
    stored = np.flatnonzero(pid >= 0)
    by_parent = stored[np.argsort(pid[stored], kind="stable")]  # children in the given order
    counts = np.bincount(pid[stored], minlength=n)
    single = by_parent[counts[pid[by_parent]] == 1]
    kids[pid[single]] = single
    many = by_parent[counts[pid[by_parent]] > 1]
    if len(many):
        starts = np.flatnonzero(np.r_[True, pid[many][1:] != pid[many][:-1]])
        for group in np.split(many, starts[1:]):
            kids[pid[group[0]]] = index._new_group(group)
    index._kids = array("i", kids.tobytes())
    loose = np.flatnonzero(pid < 0)
    if len(loose):  # chains whose parent is not stored (roots, mostly): one group per parent
        _, inverse = np.unique(P[loose], axis=0, return_inverse=True)
        inverse = inverse.ravel()
        by = np.argsort(inverse, kind="stable")  # each parent's children together, in the given order
        for members in np.split(loose[by], np.flatnonzero(np.diff(inverse[by])) + 1):
            parent = bytes(P[members[0]])
            index._loose[parent] = int(members[0]) if len(members) == 1 else index._new_group(members)
    return n


def key_hashes(keys: bytes) -> np.ndarray:
    """hash(key) & 0xFFFFFFFF of each key of ``keys`` (end to end): the tables' home slots."""
    return np.fromiter((hash(keys[o:o + KEY_BYTES]) & 0xFFFFFFFF for o in range(0, len(keys), KEY_BYTES)),
                       np.int64, len(keys) // KEY_BYTES)


def load_all(index: PrefixIndex, entries: Callable[[], Iterable[tuple[bytes, bytes, np.ndarray]]]) -> int:
    """``load`` every block ``entries()`` gives (a tier's ``entries``), then hand the heap that
    reading a large manifest took back to the OS: the rows and columns are gone, but glibc
    keeps freed heap, which would otherwise stay in the scheduler's RSS for the engine's
    lifetime. (Called here, ``entries()`` is freed before the trim: the caller holds nothing.)"""
    n = load(index, _columns_or_list(entries()))  # (freed by refcount on return)
    if n < TRIM_ABOVE:
        return n
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to hand back this way
        pass
    return n


def _columns_or_list(blocks):
    return blocks if isinstance(blocks, Blocks) else list(blocks)


def _one_by_one(index: PrefixIndex, blocks) -> int:
    checked = not isinstance(blocks, Blocks) or blocks.checked
    return sum(index.insert(key, parent, tokens, checked=checked) for key, parent, tokens in blocks)
