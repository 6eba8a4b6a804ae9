"""Checking, at first use, that a block loaded from an SSD manifest chains: key = hash(parent, tokens).

A manifest row is untrusted input. Hashing every row's parent and tokens at
start-up costs about a microsecond a row, seconds for a tier of millions, so
``index_bulk`` loads the rows unchecked and a lookup checks a block the first
time it reaches it, before the block is part of any hit (PrefixIndex._checked):

- a full block found by the walk: its key is the hash of the query's parent
  and tokens, so its row chains exactly when the row holds those same parent
  and tokens: compared, for every such block of the walk, in a few vector
  ops rather than hashed;
- a partial tail block: its stored parent and tokens hashed.

A block that fails is removed from the index and its key put on ``index.bad``
for the store to drop its row (counted by the SSD tier as a manifest
corruption); the match stops before it. Blocks that pass are marked checked.
"""

from __future__ import annotations

import numpy as np

from kvplug.keys import KEY_BYTES, hash_key


def check_walk(index, hit: list[tuple[bytes, int]], unchecked: list[tuple[int, int]],
               query: np.ndarray, root: bytes) -> int:
    """Check the walk's unchecked full blocks ((position in hit, id) each); the position of
    the first that fails (every failing one is removed), else len(hit)."""
    bt = index.block_tokens
    at = np.array([j for j, _ in unchecked], np.int64)
    ids = np.array([i for _, i in unchecked], np.int64)
    want_tokens = query[:len(hit) * bt].reshape(-1, bt)[at]
    ok = (index._tok[ids] == want_tokens).all(axis=1) & (index._len[ids] == bt)
    want_parents = b"".join(root if j == 0 else hit[j - 1][0] for j, _ in unchecked)
    stored = np.frombuffer(index._parents, np.uint8).reshape(-1, KEY_BYTES)[ids]
    ok &= (stored == np.frombuffer(want_parents, np.uint8).reshape(-1, KEY_BYTES)).all(axis=1)
    cut = len(hit)
    for (j, i), good in zip(unchecked, ok.tolist()):
        if good:
            index._checked[i] = 1
        else:
            _reject(index, hit[j][0])
            cut = min(cut, j)
    return cut


def check_block(index, i: int) -> bool:
    """Check block ``i`` by hashing its stored parent and tokens; a failing one is removed."""
    o = i << 4
    key, parent = bytes(index._keys[o:o + KEY_BYTES]), bytes(index._parents[o:o + KEY_BYTES])
    tokens = index._tok[i, :index._len[i]].astype("<i8").tobytes()
    if hash_key(parent + tokens) == key:
        index._checked[i] = 1
        return True
    _reject(index, key)
    return False


def _reject(index, key: bytes) -> None:
    index.remove(key)
    index.bad.append(key)
