"""SlotIndex against a model: writes, evictions, reads, drops in any order.

Invariants: a slot is free exactly once (never twice on the stack, never while
a read pins it or a live block holds it), live blocks are found by key at
their slot, counts match, and a pinned block is never chosen as a victim.
"""

from __future__ import annotations

import numpy as np
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvplug.tiers.slot_index import FREE, Entry, SlotIndex

SLOTS = 6
KEYS = [bytes([k]) * 16 for k in range(10)]


class Machine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.index = SlotIndex(SLOTS)
        self.index.ready()
        self.live: dict[bytes, int] = {}      # key -> slot
        self.writing: dict[bytes, int] = {}   # key -> slot taken for it
        self.pins: list[tuple[bytes, Entry]] = []
        self.checksum = 0

    @rule(k=st.sampled_from(KEYS))
    def write(self, k):
        fut, new = self.index.begin_write(k)
        if k in self.live:
            assert not new and fut.result() is True
            return
        if k in self.writing:
            assert not new
            return
        assert new
        slots, victims = self.index.take_free(1)
        for key, e in victims:  # evicted (their rows deleted by the tier): slots come to this write
            assert self.live.pop(key) == e.slot
            assert all(p.slot != e.slot for _, p in self.pins)
        got = slots + [e.slot for _, e in victims]
        if got:
            self.index.give_back(got[1:])
            self.writing[k] = got[0]
        else:
            self.index.end_write(k, None, None)  # every slot pinned: the write fails

    @precondition(lambda self: self.writing)
    @rule(data=st.data(), ok=st.booleans())
    def finish_write(self, data, ok):
        k = data.draw(st.sampled_from(sorted(self.writing)))
        g = self.writing.pop(k)
        self.checksum += 1
        self.index.end_write(k, Entry(g, self.checksum) if ok else None, g)
        if ok:
            self.live[k] = g

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def pin(self, data):
        k = data.draw(st.sampled_from(sorted(self.live)))
        e = self.index.pin(k)
        assert e is not None and e.slot == self.live[k]
        self.pins.append((k, e))

    @precondition(lambda self: self.pins)
    @rule(data=st.data(), drop=st.booleans())
    def end_read(self, data, drop):
        k, e = self.pins.pop(data.draw(st.integers(0, len(self.pins) - 1)))
        if drop and self.live.get(k) == e.slot and self.index.detach(k, e):  # a corrupt block: dropped, then unpinned
            del self.live[k]
            self.index.dropped(e)
        self.index.unpin(e)

    @invariant()
    def consistent(self):
        ix = self.index
        free = list(ix._free)
        assert len(free) == len(set(free))
        pinned = {e.slot for _, e in self.pins}
        for g in free:
            assert ix._state[g] == FREE and g not in pinned
            assert g not in self.live.values() and g not in self.writing.values()
        for k, g in self.live.items():
            assert ix.contains(k) and ix.live(k).slot == g
        assert ix.counts()[0] == len(self.live)
        assert int(np.frombuffer(ix._pins, np.int32).sum()) == len(self.pins)
        # every slot is accounted for: free, live, being written, or held by a read of a dropped block
        dropped_pinned = pinned - set(self.live.values())
        assert len(free) + len(self.live) + len(self.writing) + len(dropped_pinned) == SLOTS


TestSlotIndex = Machine.TestCase
TestSlotIndex.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
