"""KeyTable against a dict: puts and pops in any order, small tables so runs collide and wrap."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from kvplug.index_bulk import key_hashes
from kvplug.key_table import KeyTable

KEYS = st.binary(min_size=16, max_size=16)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 23)), max_size=200), st.lists(KEYS, min_size=24, max_size=24, unique=True))
def test_matches_a_dict(ops, keys):
    table, model, free = KeyTable(12), {}, list(range(12))
    for put, k in ops:
        key = keys[k]
        if put and key not in model and free:
            i = free.pop()
            table.put(key, i)
            model[key] = i
        elif not put:
            assert table.pop(key) == model.pop(key, -1)
            free = sorted(set(range(12)) - set(model.values()))
        for other in keys:
            assert table.find(other) == model.get(other, -1)
            if other in model:
                assert table.key(model[other]) == other


def test_refuses_a_duplicate_and_odd_keys():
    table = KeyTable(4)
    table.put(b"a" * 16, 0)
    try:
        table.put(b"a" * 16, 1)
    except KeyError:
        pass
    else:
        raise AssertionError("a duplicate key was accepted")
    assert table.find(b"short") == -1 and table.pop(b"short") == -1


@settings(max_examples=100, deadline=None)
@given(st.lists(KEYS, max_size=40, unique=True), st.integers(40, 64))
def test_fill_is_put_one_by_one(keys, capacity):
    ids = list(range(capacity - 1, capacity - 1 - len(keys), -1))
    filled, one = KeyTable(capacity), KeyTable(capacity)
    filled.fill(b"".join(keys), ids, key_hashes(b"".join(keys)))
    for key, i in zip(keys, ids):
        one.put(key, i)
        assert filled.find(key) == i == one.find(key) and filled.key(i) == key
    for key in keys[::2]:  # deletions shift back runs built either way
        assert filled.pop(key) == one.pop(key)
    for key in keys:
        assert filled.find(key) == one.find(key)
