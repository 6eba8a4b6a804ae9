import os
import subprocess
import sys
import textwrap
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest
import torch

from kvplug.config import KVPlugConfig
from kvplug.keys import block_key, chain_keys
from kvplug.layout import KVLayout
from kvplug.store import BlockRef, Hit, StoreEntry, TieredStore
from kvplug.tiers.base import BackingTier
from kvplug.tiers.slots import slot_stride
from kvplug.tiers.ssd import SSDTier

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_size=8, block_tokens=4)
BLOCK = LAYOUT.raw_block_bytes()  # 512
STRIDE = slot_stride(BLOCK)
ROOT = b"f" * 16


def data_for(key: bytes) -> np.ndarray:
    """The bytes a block holds: derived from its key, so any check can recompute them."""
    return np.random.default_rng(int.from_bytes(key[:8], "little")).integers(0, 256, BLOCK, dtype=np.uint8)


def put_chain(store: TieredStore, tokens) -> list[bytes]:
    """Store ``tokens`` block by block (the tail partial); the keys.

    With an SSD tier, waits for each block's SSD writes so that which block
    sits where does not depend on thread timing."""
    keys, parent = [], store.root
    for i in range(0, len(tokens), LAYOUT.block_tokens):
        block = tokens[i : i + LAYOUT.block_tokens]
        key = block_key(parent, block)
        if not store.put(parent, block, data_for(key)):
            store.flush()  # no slot free yet: the victim's bytes were on their way to SSD
            assert store.put(parent, block, data_for(key))
        if store.ssd is not None:
            store.flush()
        keys.append(key)
        parent = key
    return keys


def check_bytes(store: TieredStore, tokens, expect_tokens: int) -> None:
    for _ in range(len(tokens)):  # a promotion may wait for a write-back to free a slot
        n, blocks = store.get(tokens)
        if n >= expect_tokens:
            break
        store.flush()
    assert n == expect_tokens
    keys = chain_keys(store.root, tokens[: n - n % 4], 4)
    for key, data in zip(keys, blocks):
        assert data == data_for(key).tobytes()


class FakeSSD:
    """SSDTier's API over a dict: LRU-bounded, asynchronous, with faults to inject.

    ``hold`` (cleared) parks writes until set; ``corrupt`` keys fail their next read.
    """

    def __init__(self, capacity_blocks: int = 1000, blocks: OrderedDict | None = None):
        self.block_bytes, self.slot_stride = BLOCK, STRIDE
        self.capacity = capacity_blocks
        self.blocks = OrderedDict() if blocks is None else blocks  # key -> (parent, tokens, bytes)
        self.corrupt: set[bytes] = set()
        self.fail_writes = False
        self.hold = threading.Event()
        self.hold.set()
        self.writes = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(2)
        self._futures: list[Future] = []

    def reopen(self) -> "FakeSSD":
        return FakeSSD(self.capacity, self.blocks)

    def entries(self):
        with self._lock:
            return [(k, p, t) for k, (p, t, _) in self.blocks.items()]

    def contains(self, key):
        with self._lock:
            return key in self.blocks

    def write(self, key, parent, tokens, data):
        def run():
            self.hold.wait()
            if self.fail_writes:
                return False
            payload = np.asarray(data)[:BLOCK].tobytes()
            with self._lock:
                self.writes += 1
                self.blocks[key] = (parent, np.array(tokens), payload)
                while len(self.blocks) > self.capacity:
                    self.blocks.popitem(last=False)
            return True

        future = self._pool.submit(run)
        self._futures.append(future)
        return future

    def read(self, key, out):
        def run():
            with self._lock:
                entry = self.blocks.get(key)
                if entry is None or key in self.corrupt:
                    self.blocks.pop(key, None)
                    return False
            np.asarray(out)[:BLOCK] = np.frombuffer(entry[2], np.uint8)
            return True

        return self._pool.submit(run)

    def delete(self, key):
        with self._lock:
            self.blocks.pop(key, None)

    def delete_all(self):
        with self._lock:
            self.blocks.clear()

    def stats(self):
        return {"blocks": len(self.blocks), "corruptions": len(self.corrupt)}

    def flush(self, timeout=None):
        for f in list(self._futures):
            f.result(timeout)
        return True

    def close(self, timeout=None):
        self._pool.shutdown(wait=True)


def make(tmp_path, cpu_blocks=8, ssd=None, **overrides) -> TieredStore:
    config = KVPlugConfig(cpu_bytes=cpu_blocks * STRIDE, shm_dir=str(tmp_path), **overrides)
    return TieredStore(config, LAYOUT, BLOCK, ROOT, ssd=ssd)


@pytest.fixture
def store(tmp_path):
    s = make(tmp_path)
    yield s
    s.close()


# -- CPU tier only ---------------------------------------------------------------


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


# -- with an SSD tier (the fake for faults and timing, the real one for the rest) --


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


def test_prepare_store_takes_all_of_a_batch_or_none_of_it(store):
    good = StoreEntry.of(store.root, [1, 2, 3, 4])
    bad = StoreEntry(b"k" * 16, good.key, np.arange(9, dtype=np.int64))  # more tokens than a block holds
    with pytest.raises(ValueError, match="a block holds 1..4 tokens, got 9"):
        store.prepare_store([good, bad])
    # nothing was reserved: the good block is still new, and a batch naming it twice gets one slot
    slots = store.prepare_store([good, good])
    assert slots[0] is not None and slots[1] is None


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
