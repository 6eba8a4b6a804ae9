"""KeyTable: 16-byte keys -> small integer ids, with no Python object per key.

A fixed-capacity open-addressing hash table (linear probing, load <= 1/2,
backward-shift deletion, no tombstones) over ids the owner chooses (the SSD
tier's slot numbers): ``_keys`` holds each id's key (16 bytes at ``id * 16``),
``_hash`` its home (Python's hash of the key, kept so deleting never rehashes),
``_table`` the ids. About 28 bytes per id of capacity.
(kvplug/index.py keeps the same kind of table, growable, beside its other
per-block arrays.)
"""

from __future__ import annotations

from array import array

import numpy as np

from kvplug.keys import KEY_BYTES


class KeyTable:
    def __init__(self, capacity: int) -> None:
        """Room for ids 0 .. capacity - 1."""
        size = 16
        while size < 2 * capacity:
            size <<= 1
        self._mask = size - 1
        self._table = array("i", [-1]) * size
        self._keys = bytearray(KEY_BYTES * capacity)
        self._hash = array("I", bytes(4 * capacity))

    def _probe(self, key: bytes) -> int:
        return probe(self._table, self._keys, self._mask, key)

    def fill(self, keys: bytes, ids: np.ndarray, hashes: np.ndarray) -> None:
        """Map each key of ``keys`` (distinct, end to end) to its id in an empty table
        (``hashes``: each one's ``hash(key) & 0xFFFFFFFF``), in a few vector ops (as
        PrefixIndex._rehash): ids sorted by home slot land at home + the running overflow
        of the slots before; the few past the end wrap around one by one."""
        n = len(ids)
        if not n:
            return
        ids = np.asarray(ids, np.int64)
        hashes = np.asarray(hashes, np.int64)
        key_bytes = np.frombuffer(self._keys, np.uint8).reshape(-1, KEY_BYTES)
        key_bytes[ids] = np.frombuffer(keys, np.uint8).reshape(n, KEY_BYTES)
        del key_bytes
        hash_view = np.frombuffer(self._hash, np.uint32)
        hash_view[ids] = hashes
        del hash_view
        size = self._mask + 1
        home = hashes & self._mask
        order = np.argsort(home, kind="stable")
        home, ids = home[order], ids[order]
        run = np.arange(n, dtype=np.int64)
        home -= run
        np.maximum.accumulate(home, out=home)
        home += run  # each id's slot, unwrapped (past the end: >= size)
        fits = home < size
        table = np.frombuffer(self._table, np.int32)
        table[home[fits]] = ids[fits]
        del table
        for i in ids[~fits].tolist():
            self._table[self._probe(self.key(i))] = i

    def find(self, key: bytes) -> int:
        """The id of ``key``, or -1."""
        return self._table[self._probe(key)] if len(key) == KEY_BYTES else -1

    def put(self, key: bytes, i: int) -> None:
        """Map ``key`` to the free id ``i`` (the key must not be in the table)."""
        h = self._probe(key)
        if self._table[h] >= 0:
            raise KeyError(f"key {key.hex()} is in the table already")
        o = i << 4
        self._keys[o:o + KEY_BYTES] = key
        self._hash[i] = hash(key) & 0xFFFFFFFF
        self._table[h] = i

    def pop(self, key: bytes) -> int:
        """Remove ``key``; its id, or -1 if it was not there."""
        if len(key) != KEY_BYTES:
            return -1
        h = self._probe(key)
        i = self._table[h]
        if i >= 0:
            self._vacate(h)
        return i

    def key(self, i: int) -> bytes:
        o = i << 4
        return bytes(self._keys[o:o + KEY_BYTES])

    def _vacate(self, h: int) -> None:
        vacate(self._table, self._hash, self._mask, h)


def probe(table: array, keys: bytearray, mask: int, key: bytes) -> int:
    """The slot of a linear-probing ``table`` of ids holding ``key``'s id (``keys``: each id's
    16-byte key at ``id * 16``), or the empty slot where it would go. ``key`` must be
    KEY_BYTES long (``startswith`` compares that many bytes)."""
    h = hash(key) & mask
    while True:
        i = table[h]
        if i < 0 or keys.startswith(key, i << 4):
            return h
        h = (h + 1) & mask


def vacate(table: array, hashes: array, mask: int, h: int) -> None:
    """Empty slot ``h`` of a linear-probing ``table`` of ids (``hashes[id]``: the id's home,
    before masking), shifting back later entries of its run that may move into it."""
    j = h
    while True:
        j = (j + 1) & mask
        i = table[j]
        if i < 0:
            break
        home = hashes[i] & mask
        # i stays when its home lies cyclically in (h, j]: the hole is not on its probe path
        if not (h < home <= j if h <= j else (home > h or home <= j)):
            table[h] = i
            h = j
    table[h] = -1
