"""index_bulk.load gives the index that inserting one by one gives: same matches, same removals."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from kvplug import index_bulk
from kvplug.index import PrefixIndex
from kvplug.keys import block_key

ROOT = b"r" * 16
BT = 4


def blocks_of(prompts, roots=(ROOT,)):
    """(key, parent, tokens) of each prompt's blocks (tail partial), prompts under their roots."""
    out, seen = [], set()
    for n, tokens in enumerate(prompts):
        parent = roots[n % len(roots)]
        for i in range(0, len(tokens), BT):
            block = np.array(tokens[i:i + BT], np.int64)
            key = block_key(parent, block)
            if key not in seen:
                seen.add(key)
                out.append((key, parent, block))
            parent = key
    return out


TOKENS = st.lists(st.integers(0, 3), min_size=1, max_size=14)


@settings(max_examples=150, deadline=None)
@given(st.lists(TOKENS, min_size=1, max_size=12), st.lists(TOKENS, min_size=1, max_size=8),
       st.randoms(use_true_random=False), st.booleans())
def test_same_as_one_by_one(prompts, queries, rnd, big_tokens):
    if big_tokens:  # a token past int32: the matrix is int64
        prompts = [p[:-1] + [2**40] for p in prompts]
    blocks = blocks_of(prompts, roots=(ROOT, b"s" * 16))
    rnd.shuffle(blocks)  # children before their parents, too
    drop = [b[0] for b in blocks[::3]]
    one, bulk = PrefixIndex(ROOT, BT), PrefixIndex(ROOT, BT)
    for b in blocks:
        one.insert(*b)
    assert index_bulk.load(bulk, blocks) == len(blocks) == len(bulk)
    for q in queries + prompts:
        for root in (ROOT, b"s" * 16):
            assert bulk.match(q, root) == one.match(q, root)
    for key in drop:  # removals and later inserts work on a bulk-built index alike
        assert bulk.remove(key) and one.remove(key)
    for b in blocks[::3]:
        assert bulk.insert(*b) == one.insert(*b)
    for q in queries + prompts:
        assert bulk.match(q) == one.match(q)
    assert bulk.token_dtype == one.token_dtype


def test_a_repeated_key_or_a_non_empty_index_goes_one_by_one():
    blocks = blocks_of([[1, 2, 3, 4, 5]])
    index = PrefixIndex(ROOT, BT)
    assert index_bulk.load(index, blocks + blocks[:1]) == len(blocks)
    assert index.match([1, 2, 3, 4, 5]) == [(blocks[0][0], 4), (blocks[1][0], 1)]
    more = blocks_of([[9, 9, 9, 9]])
    assert index_bulk.load(index, more) == 1 and len(index) == 3
