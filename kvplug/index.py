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

Each parent's children keep their tokens as rows of one int64 matrix, so the
scan is one vectorised comparison even for a parent with thousands of children.
Not thread-safe: the store serialises calls.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

import xxhash

from .keys import tokens_array

xxh3_128_digest = xxhash.xxh3_128_digest


class _Children:
    """The children of one parent: keys, and their tokens as padded matrix rows.

    Most parents have one child (a chain of full blocks): its tokens are kept
    as they are, and the matrix is made when a second child arrives."""

    def __init__(self, block_tokens: int):
        self.block_tokens = block_tokens
        self.keys: list[bytes] = []
        self.row: dict[bytes, int] = {}
        self.only: np.ndarray | None = None    # the tokens of the one child, until there are two
        self.tokens: np.ndarray | None = None  # [capacity, block_tokens], from the second child on
        self.lengths: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, key: bytes, tokens: np.ndarray) -> None:
        n = len(self.keys)
        if n == 0 and self.tokens is None:
            self.only = tokens.copy()
        else:
            if self.tokens is None:
                self.tokens = np.zeros((4, self.block_tokens), dtype=np.int64)
                self.lengths = np.zeros(4, dtype=np.int64)
                self._set(0, self.only)
                self.only = None
            elif n == len(self.lengths):  # grow by doubling: amortised O(1)
                self.tokens = np.concatenate([self.tokens, np.zeros_like(self.tokens)])
                self.lengths = np.concatenate([self.lengths, np.zeros_like(self.lengths)])
            self._set(n, tokens)
        self.keys.append(key)
        self.row[key] = n

    def _set(self, i: int, tokens: np.ndarray) -> None:
        self.tokens[i, : len(tokens)] = tokens
        self.lengths[i] = len(tokens)

    def discard(self, key: bytes) -> None:
        # Move the last row into the hole: O(1), rows stay dense.
        i, last = self.row.pop(key), len(self.keys) - 1
        if i != last:
            moved = self.keys[last]
            self.keys[i], self.row[moved] = moved, i
            self.tokens[i], self.lengths[i] = self.tokens[last], self.lengths[last]
        self.keys.pop()

    def get(self, key: bytes) -> np.ndarray:
        i = self.row[key]
        if self.tokens is None:
            return self.only.copy()
        return self.tokens[i, : self.lengths[i]].copy()

    def best(self, query: np.ndarray) -> tuple[bytes | None, int]:
        """The child sharing the longest token prefix with ``query``, and that length."""
        n = len(self.keys)
        if n == 0 or len(query) == 0:
            return None, 0
        if self.tokens is None:
            m = min(len(query), len(self.only))
            equal = self.only[:m] == query[:m]
            lcp = m if equal.all() else int(equal.argmin())
            return (self.keys[0], lcp) if lcp > 0 else (None, 0)
        m = min(len(query), self.tokens.shape[1])
        equal = self.tokens[:n, :m] == query[:m]
        # Length of the run of leading matches: argmin finds the first mismatch.
        lcp = np.where(equal.all(axis=1), m, equal.argmin(axis=1))
        lcp = np.minimum(lcp, self.lengths[:n])  # padding past a partial block never counts
        i = int(lcp.argmax())
        return (self.keys[i], int(lcp[i])) if lcp[i] > 0 else (None, 0)


class PrefixIndex:
    """Blocks by key, each with its parent and its tokens (full or partial)."""

    def __init__(self, root: bytes, block_tokens: int):
        if block_tokens <= 0:
            raise ValueError(f"block_tokens={block_tokens} must be positive")
        self.root = root
        self.block_tokens = block_tokens
        self._parent: dict[bytes, bytes] = {}
        self._children: dict[bytes, _Children] = {}

    def __len__(self) -> int:
        return len(self._parent)

    def __contains__(self, key: bytes) -> bool:
        return key in self._parent

    def insert(self, key: bytes, parent: bytes, tokens: Sequence[int] | np.ndarray) -> bool:
        """Add a block; False (and no change) when the key is already stored."""
        if key in self._parent:
            return False
        tokens = tokens_array(tokens)
        if not 0 < len(tokens) <= self.block_tokens:
            raise ValueError(f"a block holds 1..{self.block_tokens} tokens, got {len(tokens)}")
        self._parent[key] = parent
        children = self._children.get(parent)
        if children is None:
            children = self._children[parent] = _Children(self.block_tokens)
        children.add(key, tokens)
        return True

    def remove(self, key: bytes) -> bool:
        """Drop a block; False when it was not stored. Its children stay but are unreachable."""
        parent = self._parent.pop(key, None)
        if parent is None:
            return False
        siblings = self._children[parent]
        siblings.discard(key)
        if not siblings:
            del self._children[parent]
        return True

    def entry(self, key: bytes) -> tuple[bytes, np.ndarray]:
        """(parent, tokens) of a stored block."""
        parent = self._parent[key]
        return parent, self._children[parent].get(key)

    def match(self, tokens: Sequence[int] | np.ndarray, root: bytes | None = None) -> list[tuple[bytes, int]]:
        """(key, tokens covered) of each block of the longest prefix of ``tokens`` stored
        under ``root`` (default: the index's root)."""
        query, bt = tokens_array(tokens), self.block_tokens
        hit: list[tuple[bytes, int]] = []
        parent, pos = self.root if root is None else root, 0
        raw = query.tobytes()  # int64: 8 bytes a token; == block_key(parent, query[pos:pos + bt])
        while pos + bt <= len(query):
            key = xxh3_128_digest(parent + raw[pos * 8:(pos + bt) * 8])
            if key not in self._parent:
                break
            hit.append((key, bt))
            parent, pos = key, pos + bt
        children = self._children.get(parent)
        if children is not None and pos < len(query):
            key, n = children.best(query[pos:])
            if key is not None:
                hit.append((key, n))
        return hit
