"""What the store tests share: a small layout, block bytes derived from a key, chains put
through the real store, and FakeSSD, an SSD tier whose faults and timing a test controls."""

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from kvplug.config import KVPlugConfig
from kvplug.keys import block_key, chain_keys
from kvplug.layout import KVLayout
from kvplug.store import TieredStore
from kvplug.tiers.slots import slot_stride


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
