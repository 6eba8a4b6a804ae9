"""The tiered store with its CPU tier alone: puts, token-granular hits, visibility, eviction and pins."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from kvplug.store import BlockRef, StoreEntry
from store_helpers import BLOCK, check_bytes, data_for, make, put_chain


@pytest.fixture
def store(tmp_path):
    s = make(tmp_path)
    yield s
    s.close()



def test_put_then_get_returns_the_bytes(store):
    tokens = list(range(10))  # 2 full blocks + a 2-token tail
    put_chain(store, tokens)
    check_bytes(store, tokens, 10)
    check_bytes(store, tokens + [99, 98], 10)
    hit = store.lookup(tokens)
    assert hit.num_tokens == 10 and hit.count("cpu") == 3 and [b.num_tokens for b in hit.blocks] == [4, 4, 2]


def test_partial_hits_to_the_token(store):
    put_chain(store, list(range(8)))
    assert store.lookup([0, 1, 2, 3, 4, 5, 77]).num_tokens == 6  # shares 2 tokens of block 2
    assert store.lookup([0, 1]).num_tokens == 2
    assert store.lookup([1]).num_tokens == 0
    check_bytes(store, [0, 1, 2, 3, 4, 5, 77], 6)


def test_block_is_visible_only_after_complete_store(store):
    entry = StoreEntry.of(store.root, [1, 2, 3, 4])
    (slot,) = store.prepare_store([entry])
    assert slot is not None and store.lookup([1, 2, 3, 4]).num_tokens == 0
    store.cpu.block_view(slot).copy_(torch.from_numpy(data_for(entry.key)))
    store.complete_store([entry.key])
    hit = store.lookup([1, 2, 3, 4])
    assert hit.blocks == [BlockRef(entry.key, 4, "cpu", slot)]


def test_abort_store_frees_the_slot(store):
    entries = [StoreEntry.of(store.root, [i]) for i in range(8)]
    assert None not in store.prepare_store(entries)
    assert store.cpu.num_free == 0
    store.abort_store([e.key for e in entries])
    assert store.cpu.num_free == 8 and store.lookup([0]).num_tokens == 0


def test_storing_an_existing_block_is_a_noop(store):
    put_chain(store, [1, 2, 3, 4])
    entry = StoreEntry.of(store.root, [1, 2, 3, 4])
    dup = StoreEntry.of(store.root, [5])
    assert store.prepare_store([entry, dup, dup])[::2] == [None, None]  # stored; prepared just before
    assert store.stats()["store"]["store_skipped_existing"] == 2


def test_lru_eviction_and_pins(store):
    keys = [put_chain(store, [i, i, i, i])[0] for i in range(8)]
    pinned = store.prepare_load(store.lookup([0, 0, 0, 0]))  # pins block 0 and makes it recent
    assert pinned.done() and pinned.num_tokens == 4
    put_chain(store, [100, 100, 100, 100])  # evicts the least recent: block 1
    assert store.lookup([1, 1, 1, 1]).num_tokens == 0 and keys[0] in store
    for i in range(200, 207):  # evict everything else; block 0 stays pinned
        put_chain(store, [i] * 4)
    assert keys[0] in store
    check_bytes(store, [0, 0, 0, 0], 4)
    assert store.stats()["store"]["evictions"] == 8


def test_everything_pinned_means_no_slot(store):
    for i in range(8):
        put_chain(store, [i] * 4)
    handles = [store.prepare_load(store.lookup([i] * 4)) for i in range(8)]
    assert not store.put(store.root, [50], data_for(b"x" * 16))
    assert store.stats()["store"]["store_no_slot"] == 1
    for h in handles:
        store.complete_load(h)
    assert store.put(store.root, [50], data_for(b"x" * 16))


def test_load_of_a_vanished_block_fails_from_there(store):
    put_chain(store, list(range(8)))
    hit = store.lookup(list(range(8)))
    ghost = BlockRef(b"g" * 16, 4, "cpu", 0)
    handle = store.prepare_load([hit.blocks[0], ghost, hit.blocks[1]])
    assert handle.done() and handle.failed == [1, 2] and handle.num_tokens == 4
    store.complete_load(handle)
    store.complete_load(handle)  # twice is harmless
    assert store.stats()["cpu"]["pinned_blocks"] == 0


def test_put_rejects_wrong_sizes(store):
    with pytest.raises(ValueError, match="512 bytes"):
        store.put(store.root, [1], b"short")
    with pytest.raises(ValueError, match="1..4 tokens"):
        store.put(store.root, [1] * 5, data_for(b"k" * 16))
    assert store.cpu.num_free == 8
    assert store.put(store.root, [1], torch.zeros(BLOCK // 2, dtype=torch.bfloat16))


def test_shared_slab_is_named_and_removed_at_close(tmp_path):
    store = make(tmp_path)
    (key,) = put_chain(store, [3, 1, 4])
    slot = store.lookup([3, 1, 4]).blocks[0].slot
    child = textwrap.dedent(f"""
        import numpy as np
        from kvplug.tiers.cpu import CPUTier
        t = CPUTier.attach({store.cpu.name!r}, {BLOCK}, shm_dir={str(tmp_path)!r})
        print(t.block_view({slot}).numpy().tobytes().hex())
    """)
    seen = subprocess.run([sys.executable, "-c", child], check=True, capture_output=True, text=True).stdout
    assert bytes.fromhex(seen.strip()) == data_for(key).tobytes()
    store.close()
    assert not os.listdir(tmp_path)


def test_private_memory_when_not_shared(tmp_path):
    with make(tmp_path, shared_memory=False) as store:
        assert store.cpu.path is None
        put_chain(store, [1, 2])
        check_bytes(store, [1, 2], 2)
    assert not os.listdir(tmp_path)


def test_stats_sections(store):
    put_chain(store, list(range(8)))
    store.lookup(list(range(10)))  # 8 hit, 2 missed
    stats = store.stats()
    assert stats["cpu"]["hit_tokens"] == 8 and stats["cpu"]["miss_tokens"] == 2
    assert stats["cpu"]["hit_blocks"] == 2 and stats["cpu"]["miss_blocks"] == 1
    assert stats["cpu"]["blocks"] == 2 and stats["cpu"]["bytes"] == 2 * BLOCK
    assert stats["store"]["lookups"] == 1 and "ssd" not in stats


def test_prepare_store_takes_all_of_a_batch_or_none_of_it(store):
    good = StoreEntry.of(store.root, [1, 2, 3, 4])
    bad = StoreEntry(b"k" * 16, good.key, np.arange(9, dtype=np.int64))  # more tokens than a block holds
    with pytest.raises(ValueError, match="a block holds 1..4 tokens, got 9"):
        store.prepare_store([good, bad])
    # nothing was reserved: the good block is still new, and a batch naming it twice gets one slot
    slots = store.prepare_store([good, good])
    assert slots[0] is not None and slots[1] is None
