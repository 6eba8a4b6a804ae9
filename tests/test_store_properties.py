"""Model-based tests: random put / lookup / load / release / restart sequences
against a simple model of what must be stored.

- no lost block: a block the model says is stored is found (and a lookup finds
  exactly the longest stored prefix);
- no wrong bytes: every load returns exactly the bytes stored under that key;
- pins respected: a pinned block keeps its slot and bytes until released.
"""

import shutil
import tempfile
from collections import Counter, OrderedDict

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from prefix_oracle import longest_prefix

from kvplug.config import KVPlugConfig
from kvplug.keys import block_key
from kvplug.layout import KVLayout
from kvplug.store import TieredStore
from kvplug.tiers.slots import slot_stride

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_size=8, block_tokens=4)
BT = LAYOUT.block_tokens
BLOCK = LAYOUT.raw_block_bytes()
STRIDE = slot_stride(BLOCK)
ROOT = b"p" * 16
TOKENS = st.lists(st.integers(0, 2), min_size=1, max_size=12)  # tiny alphabet: shared prefixes
SETTINGS = settings(max_examples=60, stateful_step_count=40, deadline=None)


def data_for(key: bytes) -> bytes:
    return np.random.default_rng(int.from_bytes(key[:8], "little")).integers(0, 256, BLOCK, dtype=np.uint8).tobytes()


def blocks_of(tokens: list[int]) -> list[tuple[bytes, bytes, list[int]]]:
    """(key, parent, tokens) of each block of a sequence, the tail partial."""
    out, parent = [], ROOT
    for i in range(0, len(tokens), BT):
        key = block_key(parent, tokens[i : i + BT])
        out.append((key, parent, tokens[i : i + BT]))
        parent = key
    return out


def stored_prefix(stored: dict, query: list[int]) -> int:
    return longest_prefix(stored, query, ROOT, BT)


def slot_bytes(store: TieredStore, slot: int) -> bytes:
    return store.cpu.block_view(slot).numpy().tobytes()


class CPUOnlyLRU(RuleBasedStateMachine):
    """CPU tier only, LRU: the model predicts exactly which blocks are stored."""

    CAPACITY = 5

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="kvplug-prop-")
        config = KVPlugConfig(cpu_bytes=self.CAPACITY * STRIDE, shm_dir=self.dir, eviction="lru")
        self.store = TieredStore(config, LAYOUT, BLOCK, ROOT)
        self.lru: OrderedDict[bytes, tuple[bytes, list[int]]] = OrderedDict()  # oldest first
        self.pins: Counter[bytes] = Counter()
        self.handles = []

    def teardown(self):
        self.store.close()
        shutil.rmtree(self.dir)

    @rule(tokens=TOKENS)
    def put(self, tokens):
        for key, parent, block in blocks_of(tokens):
            expected = self._model_put(key, parent, block)
            assert self.store.put(parent, block, data_for(key)) == expected

    def _model_put(self, key, parent, block) -> bool:
        if key in self.lru:
            return True  # copy-on-write no-op: not an access
        if len(self.lru) == self.CAPACITY:
            victim = next((k for k in self.lru if not self.pins[k]), None)
            if victim is None:
                return False
            del self.lru[victim]
        self.lru[key] = (parent, block)
        return True

    @rule(query=TOKENS)
    def lookup(self, query):
        hit = self.store.lookup(query)
        assert hit.num_tokens == stored_prefix(self.lru, query)
        assert hit.count("cpu") == len(hit.blocks)

    @rule(query=TOKENS, keep=st.booleans())
    def load(self, query, keep):
        handle = self.store.prepare_load(self.store.lookup(query))
        assert handle.done() and not handle.failed
        assert handle.num_tokens == stored_prefix(self.lru, query)
        for ref in handle.loadable:
            assert slot_bytes(self.store, ref.slot) == data_for(ref.key)
            self.lru.move_to_end(ref.key)
            self.pins[ref.key] += 1
        if keep:
            self.handles.append(handle)
        else:
            self._release(handle)

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def release(self, data):
        self._release(self.handles.pop(data.draw(st.integers(0, len(self.handles) - 1))))

    def _release(self, handle):
        for ref in handle.loadable:  # pinned all along: same slot, same bytes
            assert slot_bytes(self.store, ref.slot) == data_for(ref.key)
            self.pins[ref.key] -= 1
        self.store.complete_load(handle)

    @invariant()
    def stored_exactly_the_model(self):
        assert all(key in self.store for key in self.lru)
        assert self.store.stats()["cpu"]["blocks"] == len(self.lru)


class WithSSD(RuleBasedStateMachine):
    """A small CPU tier over a roomy SSD tier: nothing stored is ever lost
    (write-back included), restarts keep what reached the SSD."""

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="kvplug-prop-")
        self.stored: dict[bytes, tuple[bytes, list[int]]] = {}
        self.handles = []

    @initialize(write=st.sampled_from(["through", "back"]), eviction=st.sampled_from(["lru", "s3fifo"]))
    def open(self, write, eviction):
        self.config = KVPlugConfig(
            cpu_bytes=4 * STRIDE, shm_dir=self.dir, ssd_path=f"{self.dir}/ssd", ssd_bytes=256 * STRIDE,
            o_direct="off", ssd_write=write, eviction=eviction, write_queue_blocks=1000)
        self.store = TieredStore(self.config, LAYOUT, BLOCK, ROOT)

    def teardown(self):
        if hasattr(self, "store"):
            self.store.close()
        shutil.rmtree(self.dir)

    @rule(tokens=TOKENS)
    def put(self, tokens):
        for key, parent, block in blocks_of(tokens):
            if self.store.put(parent, block, data_for(key)):
                self.stored[key] = (parent, block)
            else:  # no slot free yet (pinned, or bytes on their way to SSD): allowed
                assert key not in self.store

    @rule(query=TOKENS)
    def lookup(self, query):
        assert self.store.lookup(query).num_tokens == stored_prefix(self.stored, query)

    @precondition(lambda self: len(self.handles) < 2)
    @rule(query=TOKENS, keep=st.booleans())
    def load(self, query, keep):
        hit = self.store.lookup(query)
        handle = self.store.prepare_load(hit)
        assert handle.wait(10)
        assert handle.num_tokens <= hit.num_tokens
        for ref in handle.loadable:
            assert slot_bytes(self.store, ref.slot) == data_for(ref.key)
        (self.handles.append if keep else self._release)(handle)

    @precondition(lambda self: self.handles)
    @rule()
    def release(self):
        self._release(self.handles.pop(0))

    def _release(self, handle):
        for ref in handle.loadable:
            assert slot_bytes(self.store, ref.slot) == data_for(ref.key)
        self.store.complete_load(handle)

    @rule()
    def flush(self):
        self.store.flush()

    @rule()
    def restart(self):
        for handle in self.handles:
            self._release(handle)
        self.handles = []
        self.store.close()
        self.store = TieredStore(self.config, LAYOUT, BLOCK, ROOT)
        survivors = {k: v for k, v in self.stored.items() if k in self.store}
        if self.config.ssd_write == "through":
            assert survivors == self.stored  # every block reached the SSD
        self.stored = survivors  # write-back: blocks only in the CPU tier are gone

    @invariant()
    def nothing_lost(self):
        if hasattr(self, "store"):
            assert all(key in self.store for key in self.stored)


TestCPUOnlyLRU = CPUOnlyLRU.TestCase
TestCPUOnlyLRU.settings = SETTINGS
TestWithSSD = WithSSD.TestCase
TestWithSSD.settings = SETTINGS
