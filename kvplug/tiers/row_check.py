"""A manifest row's own check: an xxh3_64 over its columns, and checking many rows at once.

``row_check`` catches a damaged row that SQLite's own checks let through (a
flipped key, slot, ...). A start-up reads every row of a manifest that may
hold millions, so ``columns`` checks them in bulk: the rows of one shape
(16-byte key, parent and fingerprint, one token count) are laid out side by
side in one numpy matrix, byte for byte what ``row_check`` hashes, and only
the xxh3 call is made per row (about 0.2 µs). Rows of any other shape, or
whose columns are not all of the right type, go through ``intact`` one by one.
``columns`` hands the intact rows on as columns, which is what start-up needs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from itertools import compress
from operator import itemgetter

import numpy as np
import xxhash

_LEN = struct.Struct("<Q").pack
_INTS = struct.Struct("<qqqq").pack
_BLOB_COLUMNS = (0, 1, 2, 6)        # key, parent, tokens, fingerprint
_INT_COLUMNS = (3, 4, 5, 7, 8, 9)  # segment, slot, checksum, format, last_access, row_check
_SIDE = 16                          # the bytes of a regular key, parent and fingerprint


def row_check(r) -> int:
    """The check of a row's columns (all but last_access), as a signed int64."""
    key, parent, tokens, fingerprint = r[0], r[1], r[2], r[6]
    c = xxhash.xxh3_64_intdigest(b"".join((  # each blob after its length, then the integers
        _LEN(len(key)), key, _LEN(len(parent)), parent, _LEN(len(tokens)), tokens,
        _LEN(len(fingerprint)), fingerprint, _INTS(r[3], r[4], r[5], r[7]))))
    return c - (1 << 64) if c >= 1 << 63 else c


def intact(r: tuple) -> bool:
    # Rows may come from a damaged file: trust nothing, not even types.
    if len(r) != 10:
        return False
    key, parent, tokens, segment, slot, checksum, fingerprint, fmt, last_access, check = r
    if not (type(key) is type(parent) is type(tokens) is type(fingerprint) is bytes
            and type(segment) is type(slot) is type(checksum) is type(fmt) is type(last_access)
            is type(check) is int):
        return False
    try:
        return check == row_check(r)
    except struct.error:  # an integer outside int64
        return False


@dataclass
class Columns:
    """Rows, column by column, in their order: each blob column as a list, and what a
    start-up needs of them as arrays, made while a chunk's objects are in the CPU's caches."""
    blobs: list[list[bytes]]  # keys, parents, tokens, fingerprints
    ints: np.ndarray          # [n, 6]: segment, slot, checksum, format, last_access, row_check
    lengths: np.ndarray       # [n, 4]: bytes of key, parent, tokens, fingerprint
    sides: np.ndarray         # [n, 3, 16] uint8: key, parent, fingerprint (zeros where not 16 bytes)

    def __getitem__(self, keep: np.ndarray) -> "Columns":
        at = np.flatnonzero(keep).tolist()
        return Columns([list(map(c.__getitem__, at)) for c in self.blobs], self.ints[keep],
                       self.lengths[keep], self.sides[keep])


def columns(rows: list[tuple]) -> tuple[np.ndarray, Columns]:
    """Check every row: (``intact(r)`` of each row as a bool array, the intact rows'
    columns). Columns are taken once, in the rows' order (a start-up's millions of rows
    are visited sequentially)."""
    n = len(rows)
    if n and set(map(len, rows)) == {10}:
        cols = [list(map(itemgetter(c), rows)) for c in range(10)]
        if all(set(map(type, cols[c])) == {bytes} for c in _BLOB_COLUMNS) \
                and all(set(map(type, cols[c])) == {int} for c in _INT_COLUMNS):
            try:
                ints = np.array([cols[c] for c in _INT_COLUMNS], np.int64).T.copy()
            except OverflowError:  # an integer outside int64 (SQLite never returns one)
                pass
            else:
                table = _columns([cols[c] for c in _BLOB_COLUMNS], ints)
                del cols
                ok = _checks_hold(table)
                return ok, (table if ok.all() else table[ok])
    ok = np.fromiter(map(intact, rows), bool, n)  # a damaged file: row by row
    good = list(compress(rows, ok))
    ints = np.array([list(map(itemgetter(c), good)) for c in _INT_COLUMNS], np.int64).reshape(6, -1).T.copy()
    return ok, _columns([list(map(itemgetter(c), good)) for c in _BLOB_COLUMNS], ints)


def _columns(blobs: list[list[bytes]], ints: np.ndarray) -> Columns:
    n = len(ints)
    lengths = np.stack([np.fromiter(map(len, c), np.int64, n) for c in blobs], axis=1).reshape(n, 4)
    sides = np.zeros((n, 3, _SIDE), np.uint8)
    for j, c in enumerate((0, 1, 3)):
        ok = lengths[:, c] == _SIDE
        picked = blobs[c] if ok.all() else [blobs[c][i] for i in np.flatnonzero(ok).tolist()]
        sides[ok, j] = np.frombuffer(b"".join(picked), np.uint8).reshape(-1, _SIDE)
    return Columns(blobs, ints, lengths, sides)


def _checks_hold(table: Columns) -> np.ndarray:
    blobs, ints, lengths = table.blobs, table.ints, table.lengths
    ok = np.zeros(len(ints), bool)
    regular = (lengths[:, 0] == _SIDE) & (lengths[:, 1] == _SIDE) & (lengths[:, 3] == _SIDE)
    for size in np.unique(lengths[regular, 2]).tolist():
        at = regular & (lengths[:, 2] == size)
        idx = np.flatnonzero(at)
        tokens = blobs[2] if at.all() else [blobs[2][i] for i in idx.tolist()]
        ok[idx] = _check_shape(table.sides[idx], tokens, size, ints[idx])
    for i in np.flatnonzero(~regular).tolist():
        r = (blobs[0][i], blobs[1][i], blobs[2][i], *ints[i, :3].tolist(), blobs[3][i], *ints[i, 3:].tolist())
        ok[i] = intact(r)
    return ok


def _check_shape(sides: np.ndarray, tokens: list[bytes], size: int, ints: np.ndarray) -> np.ndarray:
    """The checks of rows with 16-byte key, parent and fingerprint and ``size`` bytes of
    tokens, laid out side by side as ``row_check`` hashes them."""
    n, width = len(ints), 4 * 8 + 3 * _SIDE + size + 32
    buf = np.zeros((n, width), np.uint8)
    at = 0
    for column, blob_len in ((sides[:, 0], _SIDE), (sides[:, 1], _SIDE), (tokens, size), (sides[:, 2], _SIDE)):
        buf[:, at:at + 8] = np.frombuffer(_LEN(blob_len), np.uint8)
        buf[:, at + 8:at + 8 + blob_len] = column if blob_len == _SIDE and column is not tokens else \
            np.frombuffer(b"".join(column), np.uint8).reshape(n, blob_len)
        at += 8 + blob_len
    buf[:, at:] = np.ascontiguousarray(ints[:, :4], "<i8").view(np.uint8).reshape(n, 32)
    flat, digest = memoryview(buf.reshape(-1)), xxhash.xxh3_64_intdigest
    got = np.array([digest(flat[o:o + width]) for o in range(0, n * width, width)], np.uint64)
    return got.view(np.int64) == ints[:, 5]
