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
from typing import Iterable, Sequence

import numpy as np

from kvplug.index import PrefixIndex
from kvplug.keys import KEY_BYTES

TRIM_ABOVE = 10_000  # blocks loaded at start-up before the freed heap is worth handing back


def load(index: PrefixIndex, blocks: Sequence[tuple[bytes, bytes, np.ndarray]]) -> int:
    """Add (key, parent, tokens) blocks to ``index``; the blocks stored. An index that is
    not empty, or blocks that repeat a key, are inserted one by one instead."""
    n, bt = len(blocks), index.block_tokens
    if not n:
        return 0
    keys = b"".join(b[0] for b in blocks)
    parents = b"".join(b[1] for b in blocks)
    lengths = np.fromiter((len(b[2]) for b in blocks), np.int32, n)
    K = np.frombuffer(keys, np.uint8)
    if len(index) or len(K) != n * KEY_BYTES or len(parents) != n * KEY_BYTES \
            or lengths.min() < 1 or lengths.max() > bt:
        return _one_by_one(index, blocks)
    K = K.reshape(n, KEY_BYTES)
    order = np.argsort(K[:, :8].copy().view(np.uint64).ravel(), kind="stable")
    k64 = K[order, :8].copy().view(np.uint64).ravel()
    if (k64[1:] == k64[:-1]).any():  # a repeated key (or 64-bit prefix): keep it simple
        return _one_by_one(index, blocks)
    tokens = np.zeros((n, bt), np.int64)
    full = lengths == bt
    if full.all():
        tokens[:] = np.frombuffer(b"".join(np.asarray(b[2], np.int64).tobytes() for b in blocks), np.int64).reshape(n, bt)
    else:
        for i, b in enumerate(blocks):
            tokens[i, :len(b[2])] = b[2]
    wide = bool(tokens.min() < -(2**31) or tokens.max() >= 2**31)

    cap = 64
    while cap < n:
        cap *= 2
    index._tok = np.zeros((cap, bt), np.int64 if wide else np.int32)
    index._tok[:n] = tokens
    index._wide = wide
    index._len = np.zeros(cap, np.int32)
    index._len[:n] = lengths
    index._keys = bytearray(keys)
    index._parents = bytearray(parents)
    index._hash = array("I", (hash(keys[o:o + KEY_BYTES]) & 0xFFFFFFFF for o in range(0, n * KEY_BYTES, KEY_BYTES)))
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
            kids[pid[group[0]]] = -2 - len(index._groups)
            index._groups.append(array("i", group.tolist()))
    index._kids = array("i", kids.tobytes())
    for i in np.flatnonzero(pid < 0).tolist():  # chains whose parent is not stored (roots, mostly)
        parent = parents[i * KEY_BYTES:(i + 1) * KEY_BYTES]
        index._loose[parent] = index._add_child(index._loose.get(parent, -1), i)
    return n


def load_all(index: PrefixIndex, blocks: Iterable[tuple[bytes, bytes, np.ndarray]]) -> int:
    """``load`` every block of an iterable (a tier's ``entries()``), then hand the heap that
    reading a large manifest took back to the OS: the rows are gone, but glibc keeps freed
    heap, which would otherwise stay in the scheduler's RSS for the engine's lifetime."""
    n = load(index, list(blocks))  # (the rows are freed by reference counting on return)
    if n < TRIM_ABOVE:
        return n
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to hand back this way
        pass
    return n


def _one_by_one(index: PrefixIndex, blocks) -> int:
    return sum(index.insert(key, parent, tokens) for key, parent, tokens in blocks)
