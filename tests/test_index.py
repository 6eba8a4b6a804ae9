import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from prefix_oracle import longest_prefix

from kvplug.index import PrefixIndex
from kvplug.keys import block_key

ROOT = b"r" * 16
BT = 4


def chain(index, tokens):
    """Insert ``tokens`` as consecutive blocks (the tail partial); return their keys."""
    keys, parent = [], ROOT
    for i in range(0, len(tokens), BT):
        block = tokens[i : i + BT]
        key = block_key(parent, block)
        index.insert(key, parent, block)
        keys.append(key)
        parent = key
    return keys


def covered(index, tokens):
    return sum(n for _, n in index.match(tokens))


def test_full_blocks_chain_and_stop_at_first_miss():
    index = PrefixIndex(ROOT, BT)
    keys = chain(index, list(range(12)))
    assert index.match(list(range(12))) == [(k, BT) for k in keys]
    assert covered(index, list(range(8)) + [99, 99, 99, 99]) == 8
    assert index.match([7] * 8) == []
    assert index.match([]) == []


def test_partial_tail_block_is_found_to_the_token():
    index = PrefixIndex(ROOT, BT)
    keys = chain(index, [1, 2, 3, 4, 5, 6])  # one full block + a 2-token tail
    assert index.match([1, 2, 3, 4, 5, 6]) == [(keys[0], 4), (keys[1], 2)]
    assert index.match([1, 2, 3, 4, 5, 6, 7, 8, 9]) == [(keys[0], 4), (keys[1], 2)]
    assert index.match([1, 2, 3, 4, 5, 9]) == [(keys[0], 4), (keys[1], 1)]
    assert index.match([1, 2, 3, 4, 5]) == [(keys[0], 4), (keys[1], 1)]


def test_query_sharing_part_of_a_full_block_gets_a_partial_hit():
    index = PrefixIndex(ROOT, BT)
    keys = chain(index, [1, 2, 3, 4, 5, 6, 7, 8])
    assert index.match([1, 2, 3, 4, 5, 6, 0, 0]) == [(keys[0], 4), (keys[1], 2)]
    assert index.match([1, 2, 3]) == [(keys[0], 3)]
    assert index.match([2, 2, 3]) == []


def test_longest_child_wins():
    index = PrefixIndex(ROOT, BT)
    short = chain(index, [1, 2])[0]
    long = chain(index, [1, 2, 3, 9])[0]
    other = chain(index, [5, 6, 7])[0]
    assert index.match([1, 2, 3, 4]) == [(long, 3)]
    assert index.match([1, 2]) in ([(short, 2)], [(long, 2)])
    assert index.match([5, 6, 7, 8]) == [(other, 3)]


def test_insert_existing_is_noop_and_remove_makes_a_hole():
    index = PrefixIndex(ROOT, BT)
    keys = chain(index, list(range(12)))
    assert not index.insert(keys[0], ROOT, [0, 1, 2, 3])
    assert len(index) == 3
    assert index.remove(keys[1])
    assert not index.remove(keys[1])
    assert keys[2] in index  # the orphan stays stored ...
    assert index.match(list(range(12))) == [(keys[0], 4)]  # ... but is unreachable
    chain(index, list(range(8)))  # the parent comes back: so does the chain
    assert covered(index, list(range(12))) == 12


def test_entry_returns_parent_and_tokens_after_moves():
    index = PrefixIndex(ROOT, BT)
    keys = [chain(index, [i, i + 1, i + 2][: 1 + i % 3])[0] for i in range(10)]
    index.remove(keys[0])
    index.remove(keys[4])
    for i, key in enumerate(keys):
        if i not in (0, 4):
            parent, tokens = index.entry(key)
            assert parent == ROOT
            assert tokens.tolist() == [i, i + 1, i + 2][: 1 + i % 3]


def test_rejects_empty_or_oversized_blocks():
    index = PrefixIndex(ROOT, BT)
    with pytest.raises(ValueError):
        index.insert(b"k" * 16, ROOT, [])
    with pytest.raises(ValueError):
        index.insert(b"k" * 16, ROOT, [1] * (BT + 1))


def test_thousands_of_children_scan_is_vectorised_and_correct():
    index = PrefixIndex(ROOT, 16)
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 50, size=(5000, 16))
    for row in rows:
        index.insert(block_key(ROOT, row[:7]), ROOT, row[:7])  # partial blocks
    query = rows[1234, :7].copy()
    query[5] = 999
    (key, n), = index.match(query)
    assert n == 5
    assert index.entry(key)[1][:5].tolist() == rows[1234, :5].tolist()


# -- model-based: random inserts/removes against a brute-force oracle ----------

TOKENS = st.lists(st.integers(0, 2), min_size=0, max_size=10)  # tiny alphabet: lots of sharing


def oracle(stored: dict, query: list[int]) -> int:
    return longest_prefix(stored, query, ROOT, BT)


class IndexMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.index = PrefixIndex(ROOT, BT)
        self.blocks: dict[bytes, tuple[bytes, list[int]]] = {}

    @rule(tokens=TOKENS.filter(bool))
    def insert_chain(self, tokens):
        parent = ROOT
        for i in range(0, len(tokens), BT):
            block = tokens[i : i + BT]
            key = block_key(parent, block)
            assert self.index.insert(key, parent, block) == (key not in self.blocks)
            self.blocks[key] = (parent, block)
            parent = key

    @precondition(lambda self: self.blocks)
    @rule(data=st.data())
    def remove(self, data):
        key = data.draw(st.sampled_from(sorted(self.blocks)))
        assert self.index.remove(key)
        del self.blocks[key]

    @rule(query=TOKENS)
    def lookup(self, query):
        hit = self.index.match(query)
        assert sum(n for _, n in hit) == oracle(self.blocks, query)
        parent, pos = ROOT, 0
        for key, n in hit:  # every block of the hit is stored, chained, and matches
            p, toks = self.blocks[key]
            assert p == parent and toks[:n] == query[pos : pos + n]
            parent, pos = key, pos + n

    @invariant()
    def same_size(self):
        assert len(self.index) == len(self.blocks)


TestIndexMachine = IndexMachine.TestCase
TestIndexMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


@settings(max_examples=50, deadline=None)
@given(stored=st.lists(TOKENS.filter(bool), max_size=8), query=TOKENS)
def test_match_equals_oracle(stored, query):
    index, blocks = PrefixIndex(ROOT, BT), {}
    for tokens in stored:
        parent = ROOT
        for i in range(0, len(tokens), BT):
            key = block_key(parent, tokens[i : i + BT])
            index.insert(key, parent, tokens[i : i + BT])
            blocks[key] = (parent, tokens[i : i + BT])
            parent = key
    assert covered(index, query) == oracle(blocks, query)
