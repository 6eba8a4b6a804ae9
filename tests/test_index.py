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


# -- the compact layout: ids, hash table, token widths, sibling groups ------------------


def check_structure(index):
    """Every stored key is found at its own table slot, and the table holds nothing else."""
    table = list(index._table)
    live = [i for i in range(len(index._kids)) if index._len[i]]
    assert len(live) == len(index) == sum(i >= 0 for i in table)
    for i in live:
        key = bytes(index._keys[16 * i:16 * i + 16])
        assert table[index._slot(key)] == i
        assert index.entry(key)[0] == bytes(index._parents[16 * i:16 * i + 16])
    assert sorted(i for i in table if i >= 0) == live
    assert len(index._table) >= 2 * len(index)


def test_tokens_are_int32_until_one_does_not_fit():
    index = PrefixIndex(ROOT, BT)
    small = chain(index, [0, 1, 2**31 - 1, 5, 6])
    assert index.token_dtype == np.int32
    assert index.entry(small[0])[1].tolist() == [0, 1, 2**31 - 1, 5]
    assert index.entry(small[0])[1].dtype == np.int64
    big = chain(index, [7, -1, 2**40, 9])
    assert index.token_dtype == np.int64  # widened: every block keeps its exact tokens
    assert index.entry(big[0])[1].tolist() == [7, -1, 2**40, 9]
    assert index.entry(small[1])[1].tolist() == [6]
    assert covered(index, [0, 1, 2**31 - 1, 5, 6]) == 5
    assert covered(index, [7, -1, 2**40, 9]) == 4
    assert covered(index, [7, -1, 2**40 + 1]) == 2
    for edge in ([-(2**31), 1], [2**31, 1], [-(2**31) - 1]):
        index = PrefixIndex(ROOT, BT)
        key = chain(index, edge)[0]
        assert index.token_dtype == (np.int32 if edge[0] == -(2**31) else np.int64)
        assert index.entry(key)[1].tolist() == edge
        assert covered(index, edge) == len(edge)


@pytest.mark.parametrize("bt", [16, 48, 49, 128])  # up to 48 tokens tested on their bits first
def test_int32_fallback_for_long_blocks(bt):
    index = PrefixIndex(ROOT, bt)
    base = np.arange(bt, dtype=np.int64)
    negative = base.copy()
    negative[bt // 2] = -(2**31)
    k1 = block_key(ROOT, negative)
    assert index.insert(k1, ROOT, negative) and index.token_dtype == np.int32
    huge = base.copy()
    huge[bt - 3] = 2**31
    k2 = block_key(ROOT, huge)
    assert index.insert(k2, ROOT, huge) and index.token_dtype == np.int64
    assert index.entry(k1)[1].tolist() == negative.tolist()
    assert index.entry(k2)[1].tolist() == huge.tolist()
    assert index.match(huge) == [(k2, bt)]
    wrapped = huge.copy()
    wrapped[bt - 3] = -(2**31)  # == 2^31 as int32
    assert index.match(wrapped) == [(k2, bt - 3)]  # k1 shares bt // 2


def test_a_query_token_past_int32_never_matches_its_wrapped_value():
    index = PrefixIndex(ROOT, BT)
    keys = chain(index, [1, 2, 3, 4, 5, 6, 7])
    assert index.token_dtype == np.int32
    assert index.match([1, 2, 3, 2**32 + 4]) == [(keys[0], 3)]
    assert index.match([1, 2, 3, 4, 5, 6 - 2**32]) == [(keys[0], 4), (keys[1], 1)]


def test_removed_ids_are_reused_and_the_table_stays_consistent():
    rng = np.random.default_rng(1)
    index, model = PrefixIndex(ROOT, BT), {}
    for step in range(6000):
        if model and rng.random() < 0.45:
            key = list(model)[int(rng.integers(len(model)))]
            assert index.remove(key)
            del model[key]
        else:
            tokens = rng.integers(0, 1000, int(rng.integers(1, BT + 1))).tolist()
            parent = list(model)[int(rng.integers(len(model)))] if model and rng.random() < 0.7 else ROOT
            key = block_key(parent, tokens)
            assert index.insert(key, parent, tokens) == (key not in model)
            model[key] = (parent, tokens)
        if step % 1000 == 999:
            check_structure(index)
    check_structure(index)
    assert len(index._kids) < 6000 * 0.6  # ids of removed blocks were taken again
    for key, (parent, tokens) in model.items():
        assert key in index
        got_parent, got_tokens = index.entry(key)
        assert got_parent == parent and got_tokens.tolist() == tokens
    for key in list(model):
        assert index.remove(key)
    assert len(index) == 0 and not index._loose and all(g is None for g in index._groups)
    check_structure(index)


def test_a_reused_id_never_matches_past_its_own_length():
    index = PrefixIndex(ROOT, BT)
    full = chain(index, [1, 2, 3, 4])[0]
    index.remove(full)
    short = chain(index, [1, 2])[0]  # takes the id of the full block: its row still ends in 3, 4
    assert index.match([1, 2, 3, 4]) == [(short, 2)]
    other = chain(index, [1, 9])[0]  # two siblings: the group scan must clamp too
    assert index.match([1, 2, 3, 4]) == [(short, 2)]
    assert index.match([1, 9, 9]) == [(other, 2)]


def test_siblings_grow_into_a_group_and_shrink_back():
    index = PrefixIndex(ROOT, BT)
    head = chain(index, [1, 2, 3, 4])[0]
    kids = [chain(index, [1, 2, 3, 4, 5, i, 7, 8])[1] for i in range(50)]
    tail = chain(index, [1, 2, 3, 4, 9])[1]
    assert covered(index, [1, 2, 3, 4, 5, 17, 7, 8]) == 8
    assert covered(index, [1, 2, 3, 4, 5, 17, 7, 0]) == 7
    assert index.match([1, 2, 3, 4, 9, 9]) == [(head, 4), (tail, 1)]
    for key in kids[1:]:
        assert index.remove(key)
    assert covered(index, [1, 2, 3, 4, 5, 0, 7, 8]) == 8  # group of two: kids[0], tail
    assert index.remove(tail)
    assert index.match([1, 2, 3, 4, 5, 0, 7]) == [(head, 4), (kids[0], 3)]  # back to one child
    assert index.remove(kids[0])
    assert index.match([1, 2, 3, 4, 5]) == [(head, 4)]
    assert all(g is None for g in index._groups)
    again = chain(index, [1, 2, 3, 4, 6])[1]
    assert index.match([1, 2, 3, 4, 6]) == [(head, 4), (again, 1)]
    check_structure(index)


def test_children_stored_before_their_parent_are_adopted():
    # The SSD manifest has no order: a child may come back before its parent.
    tokens = list(range(20))
    keys = chain(PrefixIndex(ROOT, BT), tokens)
    index, parent = PrefixIndex(ROOT, BT), ROOT
    entries = []
    for i, key in enumerate(keys):
        entries.append((key, parent, tokens[i * BT:(i + 1) * BT]))
        parent = key
    for key, parent, block in reversed(entries):
        index.insert(key, parent, block)
        assert covered(index, tokens) == (20 if key == keys[0] else 0)
    index.remove(keys[2])
    assert covered(index, tokens) == 8
    index.insert(*entries[2])
    assert covered(index, tokens) == 20
    check_structure(index)


def test_keys_must_be_16_bytes():
    index = PrefixIndex(ROOT, BT)
    key = chain(index, [1, 2])[0]
    with pytest.raises(ValueError):
        index.insert(b"short", ROOT, [1])
    with pytest.raises(ValueError):
        index.insert(b"k" * 16, b"short", [1])
    assert key in index and key[:8] not in index and b"" not in index  # never a prefix match
    assert not index.remove(key[:8])
    with pytest.raises(KeyError):
        index.entry(key[:8])


def test_table_growth_and_deletion_across_many_sizes():
    # Rehashing places ids in bulk, wrapping runs past the table's end; deletion shifts
    # runs back. Many small random tables cover both.
    rng = np.random.default_rng(2)
    for trial in range(300):
        index, keys = PrefixIndex(ROOT, BT), []
        for _ in range(int(rng.integers(5, 70))):
            tokens = rng.integers(0, 2**31, 3).tolist()
            keys.append(block_key(ROOT, tokens))
            index.insert(keys[-1], ROOT, tokens)
        for key in keys[::3]:
            index.remove(key)
        check_structure(index)
        assert all((k in index) == (i % 3 != 0) for i, k in enumerate(keys))
