"""The tiered store over an SSD tier: write-through and write-back, promotions, failed reads and
writes, restarts, corruption (FakeSSD for faults and timing, the real SSDTier for the rest)."""

import threading

import pytest

from kvplug.config import KVPlugConfig
from kvplug.keys import chain_keys
from kvplug.store import StoreEntry, TieredStore
from kvplug.tiers.base import BackingTier
from kvplug.tiers.ssd import SSDTier
from store_helpers import BLOCK, FakeSSD, LAYOUT, ROOT, STRIDE, check_bytes, data_for, make, put_chain


def test_write_through_then_promote_after_cpu_eviction(tmp_path):
    ssd = FakeSSD()
    store = make(tmp_path, cpu_blocks=4, ssd=ssd)
    tokens = list(range(32))  # 8 blocks through a 4-slot CPU tier
    put_chain(store, tokens)
    store.flush()
    hit = store.lookup(tokens)
    assert hit.num_tokens == 32 and hit.count("ssd") == 4 and hit.count("cpu") == 4
    check_bytes(store, tokens[:16], 16)  # the 4 oldest come back from SSD
    stats = store.stats()
    assert stats["store"]["promotions"] == 4 and stats["ssd"]["hit_blocks"] == 8
    store.close()


def test_write_back_writes_only_evicted_blocks(tmp_path):
    ssd = FakeSSD()
    store = make(tmp_path, cpu_blocks=4, ssd=ssd, ssd_write="back")
    put_chain(store, list(range(16)))
    store.flush()
    assert ssd.writes == 0
    hot = put_chain(store, list(range(100, 108)))
    assert ssd.writes == 2 and store.stats()["store"]["writes_done"] == 2
    assert ssd.blocks.keys() == set(chain_keys(store.root, list(range(8)), 4))
    check_bytes(store, list(range(16)), 16)
    assert hot[0] in store
    store.close()


def test_slot_being_written_back_is_not_reused_and_full_queue_drops(tmp_path):
    ssd = FakeSSD()
    ssd.hold.clear()
    store = make(tmp_path, cpu_blocks=4, ssd=ssd, ssd_write="back", write_queue_blocks=2)
    keys = [put_chain(store, [i] * 4)[0] for i in range(4)]
    nine = StoreEntry.of(store.root, [9] * 4)
    assert store.prepare_store([nine]) == [None]  # evicts 0: written back, slot held
    assert store.prepare_store([nine]) == [None]  # evicts 1: likewise; the queue is full now
    (slot,) = store.prepare_store([nine])  # evicts 2: its write is dropped, its slot is free
    assert slot is not None
    stats = store.stats()["store"]
    assert stats["writes_queued"] == 2 and stats["writes_dropped"] == 1 and stats["evictions"] == 3
    assert keys[2] not in store  # dropped write: the block is gone
    held = {store.lookup([i] * 4).blocks[0].slot for i in (0, 1)}
    assert slot not in held and store.cpu.num_free == 0
    check_bytes(store, [0] * 4, 4)  # still in its held slot, bytes intact
    ssd.hold.set()
    store.flush()
    assert store.cpu.num_free == 2  # the written-back slots came free
    check_bytes(store, [1] * 4, 4)  # now from SSD
    store.abort_store([nine.key])
    store.close()


def test_failed_read_cuts_the_hit(tmp_path):
    ssd = FakeSSD()
    store = make(tmp_path, cpu_blocks=4, ssd=ssd)
    tokens = list(range(24))
    keys = put_chain(store, tokens)
    put_chain(store, list(range(100, 116)))  # pushes all 6 out to SSD
    store.flush()
    ssd.corrupt.add(keys[2])
    handle = store.prepare_load(store.lookup(tokens))
    assert handle.wait(5)
    assert handle.num_tokens == 8 and handle.failed == [2, 3, 4, 5]
    store.complete_load(handle)
    assert keys[2] not in store and keys[3] in store
    assert store.lookup(tokens).num_tokens == 8
    assert store.stats()["store"]["promotion_failures"] == 1
    store.close()


def test_blocks_the_ssd_dropped_are_not_promised(tmp_path):
    ssd = FakeSSD()
    store = make(tmp_path, cpu_blocks=2, ssd=ssd)
    keys = put_chain(store, list(range(16)))
    store.flush()
    ssd.delete(keys[1])  # dropped without telling the store (the SSD tier tells: on_drop)
    handle = store.prepare_load(store.lookup(list(range(16))))
    handle.wait()
    assert handle.num_tokens == 4 and store.stats()["store"]["load_misses"] == 1  # the load ends there
    store.complete_load(handle)
    assert keys[1] not in store and store.lookup(list(range(16))).num_tokens == 4
    store.close()


def test_failed_ssd_writes_lose_only_evicted_blocks(tmp_path):
    ssd = FakeSSD()
    ssd.fail_writes = True
    store = make(tmp_path, cpu_blocks=2, ssd=ssd)
    keys = put_chain(store, list(range(8)))  # write-through fails: they stay in CPU only
    assert store.stats()["store"]["writes_failed"] == 2
    check_bytes(store, list(range(8)), 8)
    assert not store.put(store.root, [7], data_for(b"7" * 16))  # evicts block 0: written back first
    store.flush()  # ... which fails: block 0 is gone, block 1 stays
    assert keys[0] not in store and keys[1] in store
    assert store.stats()["store"]["writes_failed"] == 3 and store.cpu.num_free == 1
    store.close()


def test_concurrent_loads_share_one_promotion_and_early_complete_is_safe(tmp_path):
    ssd = FakeSSD()
    store = make(tmp_path, cpu_blocks=2, ssd=ssd)
    put_chain(store, list(range(12)))
    store.flush()
    hit = store.lookup([0, 1, 2, 3])
    assert hit.blocks[0].tier == "ssd"
    a, b = store.prepare_load(hit), store.prepare_load(hit)
    store.complete_load(a)  # before its read finished: the read keeps its own pin
    assert b.wait(5) and a.wait(5) and b.slots == a.slots
    assert store.stats()["store"]["promotions"] == 1
    store.complete_load(b)
    check_bytes(store, [0, 1, 2, 3], 4)
    store.close()


def test_restart_rebuilds_the_index_from_ssd(tmp_path):
    config = dict(ssd_path=str(tmp_path / "ssd"), ssd_bytes=64 * STRIDE, o_direct="off")
    store = make(tmp_path, **config)
    tokens = list(range(30))
    put_chain(store, tokens)
    store.close()
    store = make(tmp_path, **config)
    hit = store.lookup(tokens)
    assert hit.num_tokens == 30 and hit.count("ssd") == 8
    assert isinstance(store.ssd, BackingTier) and isinstance(FakeSSD(), BackingTier)
    check_bytes(store, tokens, 30)
    assert store.stats()["ssd"]["blocks"] == 8
    store.close()


def test_failed_start_leaves_no_slab(tmp_path):
    config = dict(ssd_path=str(tmp_path / "ssd"), ssd_bytes=64 * STRIDE, o_direct="off")
    shm = tmp_path / "shm"
    shm.mkdir()
    with SSDTier(config["ssd_path"], 64 * STRIDE, BLOCK, ROOT, o_direct="off"):  # holds the directory
        with pytest.raises(RuntimeError, match="in use"):
            TieredStore(KVPlugConfig(cpu_bytes=4 * STRIDE, shm_dir=str(shm), **config), LAYOUT, BLOCK, ROOT)
    assert not list(shm.iterdir())


def test_real_ssd_corruption_is_a_miss_after_restart(tmp_path):
    config = dict(ssd_path=str(tmp_path / "ssd"), ssd_bytes=64 * STRIDE, o_direct="off")
    store = make(tmp_path, **config)
    keys = put_chain(store, list(range(12)))
    store.close()
    (segment,) = [p for p in (tmp_path / "ssd").iterdir() if p.suffix == ".kvs"]
    raw = bytearray(segment.read_bytes())
    raw[STRIDE + 7] ^= 0xFF  # flip a byte of the block in SSD slot 1
    segment.write_bytes(bytes(raw))
    store = make(tmp_path, **config)
    n, blocks = store.get(list(range(12)))  # the block in SSD slot 1 is bad: the hit ends before it
    assert n in (0, 4, 8) and all(d == data_for(k).tobytes() for d, k in zip(blocks, keys))
    assert store.stats()["ssd"]["corruptions"] == 1
    assert keys[n // 4] not in store
    store.close()


def test_threads_store_and_load_concurrently(tmp_path):
    config = dict(ssd_path=str(tmp_path / "ssd"), ssd_bytes=512 * STRIDE, o_direct="off")
    store = make(tmp_path, cpu_blocks=16, **config)
    errors = []

    def worker(w):
        try:
            for i in range(30):
                tokens = [w, i % 7, i % 5, 1, 2, 3, 4, 5]
                keys = chain_keys(store.root, tokens, 4)
                store.put(store.root, tokens[:4], data_for(keys[0]))  # no slot free: fine, skipped
                store.put(keys[0], tokens[4:], data_for(keys[1]))
                n, blocks = store.get(tokens)
                # A partial hit may be on another worker's block: check the full ones.
                assert all(d == data_for(k).tobytes() for d, k in zip(blocks[: n // 4], keys))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    store.close()


def test_events_say_which_blocks_enter_and_leave_the_cpu_tier(tmp_path):
    config = KVPlugConfig(cpu_bytes=2 * STRIDE, shm_dir=str(tmp_path))
    with TieredStore(config, LAYOUT, BLOCK, ROOT, events=True) as store:
        a, b, c = (StoreEntry.of(store.root, [i, i, i, i]) for i in (1, 2, 3))
        store.prepare_store([a, b])
        store.complete_store([a.key])
        store.abort_store([b.key])  # never readable: never announced
        assert store.take_events() == [(True, a.key)]
        assert store.take_events() == []
        store.prepare_store([b, c])  # two slots: a is evicted for them
        store.complete_store([b.key, c.key])
        assert store.take_events() == [(False, a.key), (True, b.key), (True, c.key)]
