"""PrefixIndex: the longest stored prefix of a token sequence, to the token.

Blocks chain by key (``keys.block_key(parent, tokens)``) from a root
fingerprint. A lookup hashes the query's full blocks one after another while
their keys are stored; where that walk stops, it scans the stored children of
the last matched parent (full or partial tail blocks) for the longest common
token prefix with the rest of the query. So a request that shares only the
first n tokens of a stored block gets an n-token hit on it (it loads the block
and overwrites the rest in its own copy).

A chain with a hole (a removed parent) ends there: the walk only ever descends
from a block it matched, so orphans are unreachable until their parent is
stored again.

Compact: an SSD tier holds millions of blocks, so no Python object is kept per
block. Each block gets a small integer id (ids of removed blocks are reused)
and lives in flat arrays indexed by it:

- ``_keys`` / ``_parents``: bytearrays of 16-byte keys;
- ``_table``: an open-addressing hash table of ids (linear probing, load
  <= 1/2, backward-shift deletion, no tombstones), homed on ``hash(key)``,
  which ``_hash`` keeps per id so that growing and deleting never rehash keys;
- ``_tok``: a [capacity, block_tokens] token matrix (int32 while every stored
  token fits, widened once to int64 when one does not), ``_len`` its lengths;
- ``_kids``: a parent's children: -1 none, ``c >= 0`` the one child (a chain of
  full blocks: the common case), ``<= -2`` group ``-2 - kids`` in ``_groups``,
  an ``array('i')`` of child ids sorted by their first token (kept beside it
  in ``_firsts``), so that a scan bisects to the children that share the
  query's first token and compares only their rows: a root with thousands of
  children costs a miss no more than a chain. Children of a parent that is
  not stored (a root, a removed block) hang off ``_loose`` by its key and are
  adopted when a block of that key is stored;
- ``_checked``: 1 once a block's key is known to be the hash of its parent and
  tokens. Blocks inserted one by one are (the caller made the key); blocks
  loaded in bulk from an SSD manifest (untrusted rows) are checked when a
  lookup first reaches them: one that fails is removed, its key put on
  ``bad`` (for the store to drop its row), and the match stops before it.

Per block: key 16 + parent 16 + table 8..16 + hash 4 + kids 4 + length 4 + checked 1 +
tokens (4 each while int32): ~115 bytes at 16 tokens a block, ~560 at 128
(the old dict-and-object index: ~880 and ~1,770 of RSS; bench/scale_index.py).
Memory stays at the peak block count: removed ids are reused, never returned.
Not thread-safe: the store serialises calls.
"""

from __future__ import annotations

import hashlib
from array import array
from bisect import bisect_left, bisect_right
from typing import Sequence

import numpy as np

from .index_check import check_block, check_walk
from .key_table import probe, vacate
from .keys import KEY_BYTES, tokens_array

_sha256 = hashlib.sha256  # keys.hash_key's hash: match inlines it


# Bits 31..63 of a little-endian int64 word: a token outside [0, 2^31) sets one of them.
# int.from_bytes(tokens.tobytes()) & (this word repeated per token) tests a whole block in
# one big-int op, far cheaper than numpy's min/max on a few tokens.
_INT32_MASK_WORD = 0xFFFFFFFF80000000
_INT64 = np.dtype(np.int64)


def _fits_int32(tokens: np.ndarray) -> bool:
    # argmin/argmax, not min/max: those are ufunc reductions, several times slower on a block
    return bool(tokens[tokens.argmin()] >= -(2**31) and tokens[tokens.argmax()] < 2**31)


class PrefixIndex:
    """Blocks by key, each with its parent and its tokens (full or partial)."""

    def __init__(self, root: bytes, block_tokens: int):
        if block_tokens <= 0:
            raise ValueError(f"block_tokens={block_tokens} must be positive")
        self.root = root
        self.block_tokens = block_tokens
        # Do a block's tokens fit int32? Tested on their bits first up to 48 tokens a block (a
        # big-int op: cheap for few tokens), by their extremes alone past that (cheaper there).
        self._check_bits = block_tokens <= 48
        self._high_bits = int.from_bytes(_INT32_MASK_WORD.to_bytes(8, "little") * block_tokens, "little")
        self._keys = bytearray()         # id -> key, 16 bytes each
        self._parents = bytearray()      # id -> parent key
        self._kids = array("i")          # id -> its children (see module doc)
        self._hash = array("I")          # id -> hash(key) mod 2^32: its home slot, without rehashing
        self._tok = np.zeros((64, block_tokens), np.int32)  # int64 once _wide
        self._len = np.zeros(64, np.int32)  # 0: a free id
        self._free = array("i")          # ids of removed blocks, reused first
        self._groups: list[array | None] = []   # child ids, by first token
        self._firsts: list[array | None] = []   # the first token of each, sorted
        self._checked = bytearray(64)    # id -> 1: its key is its parent's and tokens' hash
        self.bad: list[bytes] = []       # keys of blocks whose check failed, for the caller to drop
        self._free_groups: list[int] = []
        self._loose: dict[bytes, int] = {}  # parent key not stored -> its children
        self._table = array("i", [-1]) * 16
        self._mask = 15
        self._count = 0
        self._last = (b"", -1)           # (key, id) of the last insert: a chain's next parent
        self._wide = False               # a token outside int32 was stored: _tok is int64

    # -- hash table --------------------------------------------------------------

    def _slot(self, key: bytes) -> int:
        return probe(self._table, self._keys, self._mask, key)

    def _find(self, key: bytes) -> int:
        """The id of ``key``, or -1."""
        return self._table[self._slot(key)] if len(key) == KEY_BYTES else -1

    def _rehash(self, capacity: int) -> None:
        """A new table of ``capacity`` slots (a power of two), built in a few vector ops:
        ids sorted by home slot land at home + the running overflow of the slots before.
        (int32 throughout up to 2^30 slots: the temporaries stay small.)"""
        hw = len(self._kids)
        wide = np.int64 if capacity > 2**30 else np.int32
        home = np.array(self._hash, dtype=np.uint32)  # a copy: the array may grow later
        home &= np.uint32(capacity - 1)
        home = home.view(np.int32) if wide is np.int32 else home.astype(np.int64)
        ids = np.flatnonzero(self._len[:hw]).astype(np.int32) if self._free else None
        if ids is not None:
            home = home[ids]
        order = np.argsort(home, kind="stable")
        home = home[order]
        ids = order.astype(np.int32) if ids is None else ids[order]
        del order
        run = np.arange(len(ids), dtype=wide)
        home -= run
        np.maximum.accumulate(home, out=home)
        home += run  # now each id's slot, unwrapped (past the end: >= capacity)
        del run
        table = array("i", [-1]) * capacity
        view = np.frombuffer(table, np.int32)  # the table never resizes: a view is safe
        fits = home < capacity
        view[home[fits]] = ids[fits]
        del view
        self._table, self._mask = table, capacity - 1
        for i in ids[~fits].tolist():  # past the end: wrap around, probing from home
            o = i << 4
            table[self._slot(bytes(self._keys[o:o + 16]))] = i

    def _vacate(self, h: int) -> None:
        vacate(self._table, self._hash, self._mask, h)

    # -- children ------------------------------------------------------------------

    def _new_group(self, ids: Sequence[int] | np.ndarray) -> int:
        """A group of these children (sorted by first token, ties in the given order); its ``kids`` value."""
        ids = np.asarray(ids, np.int32)
        firsts = self._tok[ids, 0].astype(np.int64)
        order = np.argsort(firsts, kind="stable")
        group, first = array("i", ids[order].tobytes()), array("q", firsts[order].tobytes())
        if self._free_groups:
            g = self._free_groups.pop()
            self._groups[g], self._firsts[g] = group, first
        else:
            g = len(self._groups)
            self._groups.append(group)
            self._firsts.append(first)
        return -2 - g

    def _add_child(self, kids: int, i: int) -> int:
        if kids == -1:
            return i
        if kids >= 0:
            return self._new_group((kids, i))
        g = -2 - kids
        t = int(self._tok[i, 0])
        j = bisect_right(self._firsts[g], t)
        self._groups[g].insert(j, i)
        self._firsts[g].insert(j, t)
        return kids

    def _drop_child(self, kids: int, i: int) -> int:
        if kids >= 0:
            return -1
        g = -2 - kids
        group, firsts = self._groups[g], self._firsts[g]
        t = int(self._tok[i, 0])
        j = bisect_left(firsts, t)
        j = group.index(i, j, bisect_right(firsts, t))
        del group[j], firsts[j]
        if len(group) > 1:
            return kids
        self._groups[g] = self._firsts[g] = None
        self._free_groups.append(g)
        return group[0]

    def _children(self, parent: bytes, pid: int) -> int:
        return self._kids[pid] if pid >= 0 else self._loose.get(parent, -1)

    # -- API ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._count

    def __contains__(self, key: bytes) -> bool:
        return self._find(key) >= 0

    def insert(self, key: bytes, parent: bytes, tokens: Sequence[int] | np.ndarray, checked: bool = True) -> bool:
        """Add a block; False (and no change) when the key is already stored. ``checked``:
        the caller made the key from parent and tokens (else a lookup checks it first)."""
        if len(key) != KEY_BYTES or len(parent) != KEY_BYTES:
            raise ValueError(f"keys are {KEY_BYTES} bytes, got {len(key)} (key) and {len(parent)} (parent)")
        table, at, mask = self._table, self._keys.startswith, self._mask
        h = hash(key) & mask  # _slot, inlined
        i = table[h]
        while i >= 0:
            if at(key, i << 4):
                if not checked or self._checked[i]:
                    return False
                # an unchecked (maybe forged) manifest row under the caller's own key: replaced
                self.remove(key)
                return self.insert(key, parent, tokens, checked)
            h = (h + 1) & mask
            i = table[h]
        if type(tokens) is not np.ndarray or tokens.dtype is not _INT64:
            tokens = tokens_array(tokens)
        n = len(tokens)
        if not 0 < n <= self.block_tokens or tokens.ndim != 1:
            raise ValueError(f"a block holds 1..{self.block_tokens} tokens, got {len(tokens)}")
        if not self._wide and (not self._check_bits or int.from_bytes(tokens.tobytes(), "little") & self._high_bits) \
                and not _fits_int32(tokens):  # negative in-range tokens set bits too: look again
            self._widen()
        if (self._count + 1) * 2 > len(self._table):
            self._rehash(len(self._table) * 2)
            h = self._slot(key)
        kids = self._kids
        if self._free:
            i = self._free.pop()
            o = i << 4
            self._keys[o:o + 16] = key
            self._parents[o:o + 16] = parent
            self._hash[i] = hash(key) & 0xFFFFFFFF
        else:
            i = len(kids)
            self._keys += key
            self._parents += parent
            kids.append(-1)
            self._hash.append(hash(key) & 0xFFFFFFFF)
            if i == len(self._len):
                self._grow()
        if n == self.block_tokens:
            self._tok[i] = tokens
        else:
            self._tok[i, :n] = tokens
        self._len[i] = n
        self._checked[i] = checked
        self._table[h] = i
        self._count += 1
        loose = self._loose
        if loose:
            kids[i] = loose.pop(key, -1)  # orphans of an earlier block of this key
        last_key, p = self._last
        if parent != last_key:
            p = self._find(parent)
        if p < 0:
            loose[parent] = self._add_child(loose.get(parent, -1), i)
        elif kids[p] == -1:  # a chain: the parent's first child
            kids[p] = i
        else:
            kids[p] = self._add_child(kids[p], i)
        self._last = (key, i)
        return True

    def remove(self, key: bytes) -> bool:
        """Drop a block; False when it was not stored. Its children stay but are unreachable."""
        if len(key) != KEY_BYTES:
            return False
        h = self._slot(key)
        i = self._table[h]
        if i < 0:
            return False
        o = i << 4
        parent = bytes(self._parents[o:o + 16])
        p = self._find(parent)
        if p >= 0:
            self._kids[p] = self._drop_child(self._kids[p], i)
        else:
            kids = self._drop_child(self._loose[parent], i)
            if kids == -1:
                del self._loose[parent]
            else:
                self._loose[parent] = kids
        if self._kids[i] != -1:  # its children wait for a block of this key to come back
            self._loose[bytes(key)] = self._kids[i]
            self._kids[i] = -1
        self._len[i] = 0
        self._free.append(i)
        self._count -= 1
        self._vacate(h)
        if self._last[1] == i:
            self._last = (b"", -1)
        return True

    def entry(self, key: bytes) -> tuple[bytes, np.ndarray]:
        """(parent, tokens) of a stored block; the tokens are a fresh int64 array."""
        i = self._find(key)
        if i < 0:
            raise KeyError(key)
        o = i << 4
        return bytes(self._parents[o:o + 16]), self._tok[i, : self._len[i]].astype(np.int64)

    def match(self, tokens: Sequence[int] | np.ndarray, root: bytes | None = None) -> list[tuple[bytes, int]]:
        """(key, tokens covered) of each block of the longest prefix of ``tokens`` stored
        under ``root`` (default: the index's root). A block not checked yet is checked first
        (index_check.py): one that fails ends the match before it, and goes on ``bad``."""
        query, bt = tokens_array(tokens), self.block_tokens
        table, at, mask, checked, sha = self._table, self._keys.startswith, self._mask, self._checked, _sha256
        hit: list[tuple[bytes, int]] = []
        unchecked: list[tuple[int, int]] = []  # (position in hit, id)
        root = self.root if root is None else root
        parent, pid = root, -1
        raw = query.tobytes()  # int64: 8 bytes a token; == block_key(parent, query[pos:pos + bt])
        step = bt * 8
        for start in range(0, len(raw) - step + 1, step):
            key = sha(parent + raw[start:start + step]).digest()[:KEY_BYTES]  # keys.hash_key, inlined
            h = hash(key) & mask  # _find, inlined: the hot loop
            i = table[h]
            while i >= 0 and not at(key, i << 4):
                h = (h + 1) & mask
                i = table[h]
            if i < 0:
                break
            if not checked[i]:
                unchecked.append((len(hit), i))
            hit.append((key, bt))
            parent, pid = key, i
        if unchecked and (cut := check_walk(self, hit, unchecked, query, root)) < len(hit):
            del hit[cut:]
            parent, pid = (hit[-1][0] if hit else root), -1
        pos = len(hit) * bt
        while pos < len(query):
            if pid < 0:
                pid = self._find(parent)
            i, n = self._best(self._children(parent, pid), query[pos:])
            if n > 0 and not checked[i] and not check_block(self, i):
                continue  # removed: the next best child, if any
            if n > 0:
                hit.append((bytes(self._keys[i << 4:(i << 4) + 16]), n))
            break
        return hit

    def _best(self, kids: int, query: np.ndarray) -> tuple[int, int]:
        """The child sharing the longest token prefix with ``query``, and that length."""
        if kids == -1:
            return -1, 0
        tok, lengths = self._tok, self._len
        if kids >= 0:
            m = min(int(lengths[kids]), len(query))
            differ = tok[kids, :m] != query[:m]
            k = int(differ.argmax())
            return kids, (k if differ[k] else m)
        g, first = -2 - kids, int(query[0])
        firsts = self._firsts[g]  # a child sharing anything shares its first token: bisect to those
        lo = bisect_left(firsts, first)
        hi = bisect_right(firsts, first, lo)
        if lo == hi:
            return -1, 0
        ids = np.frombuffer(self._groups[g], np.int32)[lo:hi].copy()  # a copy: the group may change
        m = min(len(query), self.block_tokens)
        differ = tok[ids, :m] != query[:m]
        lcp = np.where(differ.any(axis=1), differ.argmax(axis=1), m)
        lcp = np.minimum(lcp, lengths[ids])  # a stale or padded tail past a block's length never counts
        j = int(lcp.argmax())
        return int(ids[j]), int(lcp[j])

    # -- storage -------------------------------------------------------------------------

    def _grow(self) -> None:
        """Double the token matrix. np.zeros pages are untouched until written, so rows
        past the used ones cost address space, not memory."""
        cap = 2 * len(self._len)
        tok = np.zeros((cap, self.block_tokens), self._tok.dtype)
        tok[: len(self._len)] = self._tok
        lengths = np.zeros(cap, np.int32)
        lengths[: len(self._len)] = self._len
        self._tok, self._len = tok, lengths
        self._checked += bytes(cap - len(self._checked))

    def _widen(self) -> None:
        """A token outside int32: hold every block's tokens as int64 from now on."""
        tok = np.zeros(self._tok.shape, np.int64)
        tok[: len(self._kids)] = self._tok[: len(self._kids)]
        self._tok, self._wide = tok, True

    @property
    def token_dtype(self) -> np.dtype:
        return self._tok.dtype

    def nbytes(self) -> int:
        """Bytes held by the arrays (the token matrix counted to its used rows)."""
        hw = len(self._kids)
        groups = sum(12 * len(g) + 128 for g in self._groups if g is not None)
        per_id = self._kids.itemsize + self._hash.itemsize + self._tok.itemsize * self.block_tokens + self._len.itemsize + 1
        return (len(self._keys) + len(self._parents) + hw * per_id + self._table.itemsize * len(self._table)
                + groups + 100 * len(self._loose))
