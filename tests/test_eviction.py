import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvplug.eviction import LRU, S3FIFO, make_policy


def k(i: int) -> bytes:
    return i.to_bytes(16, "little")


def nothing_pinned(key: bytes) -> bool:
    return False


def test_lru_evicts_least_recently_used_first():
    lru = LRU()
    for i in range(4):
        lru.insert(k(i))
    lru.touch(k(0))
    assert lru.evict(2, nothing_pinned) == [k(1), k(2)]
    assert len(lru) == 2 and k(1) not in lru
    assert lru.evict(5, nothing_pinned) == [k(3), k(0)]
    assert lru.evict(1, nothing_pinned) == []


def test_lru_skips_pinned_and_remove_forgets():
    lru = LRU()
    for i in range(4):
        lru.insert(k(i))
    lru.remove(k(1))
    lru.remove(k(99))  # absent: fine
    pinned = {k(0), k(2)}
    assert lru.evict(3, pinned.__contains__) == [k(3)]
    assert lru.evict(3, lambda key: True) == []
    assert len(lru) == 2


def test_s3fifo_one_hit_wonders_leave_before_reused_keys():
    s3 = S3FIFO(capacity=10)
    for i in range(5):
        s3.insert(k(i))
        s3.touch(k(i))  # reused
    for i in range(5, 15):
        s3.insert(k(i))  # a scan: never touched again
    victims = s3.evict(10, nothing_pinned)
    assert set(victims) == {k(i) for i in range(5, 15)}
    assert all(k(i) in s3 for i in range(5))


def test_s3fifo_ghost_hit_goes_to_main():
    s3 = S3FIFO(capacity=10)
    s3.insert(k(1))
    assert s3.evict(1, nothing_pinned) == [k(1)]
    s3.insert(k(1))  # back soon after eviction: straight to main
    for i in range(2, 6):
        s3.insert(k(i))
    assert k(1) not in s3.evict(4, nothing_pinned)


def test_s3fifo_skips_pinned_even_when_main_is_all_pinned():
    s3 = S3FIFO(capacity=20)
    for i in range(10):
        s3.insert(k(i))
        s3.touch(k(i))
    s3.evict(1, lambda key: key != k(0))  # drives every reused key into main
    for i in range(10, 12):
        s3.insert(k(i))  # small, below its target size
    main_keys = {k(i) for i in range(1, 10)}
    assert set(s3.evict(5, main_keys.__contains__)) == {k(10), k(11)}
    assert s3.evict(5, lambda key: True) == []


@pytest.mark.parametrize("name", ["lru", "s3fifo"])
@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from("itre"), st.integers(0, 15)), max_size=60),
       pinned=st.sets(st.integers(0, 15)))
def test_policy_never_hands_out_pinned_or_unknown_keys(name, ops, pinned):
    policy = make_policy(name, capacity=8)
    present: set[bytes] = set()
    pins = {k(i) for i in pinned}
    for op, i in ops:
        if op == "i":
            policy.insert(k(i))
            present.add(k(i))
        elif op == "t":
            policy.touch(k(i))
        elif op == "r":
            policy.remove(k(i))
            present.discard(k(i))
        else:
            victims = policy.evict(i % 4 + 1, pins.__contains__)
            assert len(victims) == len(set(victims)) <= i % 4 + 1
            assert not pins & set(victims) and set(victims) <= present
            present -= set(victims)
            if not victims:
                assert present <= pins  # evicts whenever something unpinned is there
        assert len(policy) == len(present)
        assert all(key in policy for key in present)


def test_make_policy_rejects_unknown_names():
    assert isinstance(make_policy("lru", 4), LRU)
    assert isinstance(make_policy("s3fifo", 4), S3FIFO)
    with pytest.raises(ValueError, match="eviction='fifo'"):
        make_policy("fifo", 4)
