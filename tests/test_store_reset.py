"""reset() with SSD transfers in flight: a late promotion or write-back never brings an old block back."""

from __future__ import annotations

import threading

from store_helpers import FakeSSD, data_for, make, put_chain


class HeldReads(FakeSSD):
    """Reads park until ``release`` is set."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()

    def read(self, key, out):
        read = super().read

        def later():
            self.release.wait(10)
            return read(key, out).result()
        return self._pool.submit(later)


def test_a_promotion_landing_after_a_reset_is_dropped_and_nothing_breaks(tmp_path):
    ssd = HeldReads()
    store = make(tmp_path, cpu_blocks=4, ssd=ssd, ssd_write="through")
    put_chain(store, [1, 2, 3, 4])
    store.flush()
    for i in range(10, 14):  # push it out of the CPU tier: it is on SSD only now
        put_chain(store, [i] * 4)
    hit = store.lookup([1, 2, 3, 4])
    assert [r.tier for r in hit.blocks] == ["ssd"]
    handle = store.prepare_load(hit)  # a promotion in flight...
    store.complete_load(handle)       # ...that its request gave up on
    store.reset()
    ssd.release.set()
    handle.wait(10)
    store.flush()
    assert store.lookup([1, 2, 3, 4]).num_tokens == 0  # the late read did not make it visible
    for i in range(20, 30):  # evictions must not trip over the dropped block
        put_chain(store, [i] * 4)
    assert store.stats()["cpu"]["pinned_blocks"] == 0
    new = put_chain(store, [1, 2, 3, 4])  # stored again under the new epoch: fine
    assert store.get([1, 2, 3, 4])[1] == [data_for(new[0]).tobytes()]
    store.close()
