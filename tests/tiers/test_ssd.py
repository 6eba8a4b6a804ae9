"""SSDTier unit tests: round trips, persistence, LRU, pins, locking, O_DIRECT modes."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch

from kvplug.keys import FORMAT_VERSION
from kvplug.tiers.aligned_io import DirectoryBusy, probe_direct
from kvplug.tiers.ssd import SSDTier
from kvplug.tiers.slots import slot_stride
from ssd_helpers import BLOCK, FP, block, content, slot

STRIDE = slot_stride(BLOCK)


def tier(path, blocks=16, **kw) -> SSDTier:
    return SSDTier(str(path), blocks * STRIDE, BLOCK, kw.pop("fingerprint", FP), **kw)


def put(t: SSDTier, i: int, parent: bytes = FP) -> bytes:
    key, parent, tokens = block(i, parent)
    assert t.write(key, parent, tokens, slot(fill=content(key))).result() is True
    return key


def get(t: SSDTier, key: bytes) -> np.ndarray | None:
    out = slot()
    return out[:BLOCK].copy() if t.read(key, out).result() else None


def test_geometry(tmp_path):
    with tier(tmp_path) as t:
        assert t.slot_stride == STRIDE == 12288
        assert t.stats()["capacity_blocks"] == 16


def test_round_trip_zero_copy_and_bounce(tmp_path):
    with tier(tmp_path) as t:
        key = put(t, 1)
        assert t.contains(key)
        assert np.array_equal(get(t, key), content(key))
        # Unaligned, block-sized buffers go through a bounce buffer.
        k2, p2, tok2 = block(2)
        src = np.zeros(BLOCK + 1, np.uint8)[1:]
        src[:] = content(k2)
        assert t.write(k2, p2, tok2, src).result()
        out = np.zeros(BLOCK + 1, np.uint8)[1:]
        assert t.read(k2, out).result() and np.array_equal(out, content(k2))
        # torch slot views (as the CPU tier hands out) work in place.
        k3, p3, tok3 = block(3)
        slab = torch.frombuffer(slot(), dtype=torch.uint8)
        slab[:BLOCK] = torch.from_numpy(content(k3))
        assert t.write(k3, p3, tok3, slab).result()
        out_t = torch.frombuffer(slot(), dtype=torch.uint8)
        assert t.read(k3, out_t).result()
        assert torch.equal(out_t[:BLOCK], torch.from_numpy(content(k3)))
        s = t.stats()
        assert s["blocks"] == 3 and s["writes"] == 3 and s["read_hits"] == 3
        assert s["bytes"] == 3 * BLOCK and s["read_bytes"] == 3 * BLOCK


def test_miss_and_existing_key_is_noop(tmp_path):
    with tier(tmp_path) as t:
        key = put(t, 1)
        assert t.write(key, FP, block(1)[2], slot()).result() is True  # not rewritten
        assert np.array_equal(get(t, key), content(key))
        assert t.stats()["writes"] == 1
        assert t.read(block(99)[0], slot()).result() is False
        assert not t.contains(block(99)[0])
        assert t.stats()["read_misses"] == 1


def test_persists_and_lists_entries(tmp_path):
    with tier(tmp_path) as t:
        k1 = put(t, 1)
        k2 = put(t, 2, parent=k1)
    with tier(tmp_path) as t:
        got = {k: (p, tok) for k, p, tok in t.entries()}
        assert set(got) == {k1, k2}
        assert got[k2][0] == k1 and got[k2][1].dtype == np.int64
        assert list(got[k2][1]) == list(block(2, k1)[2])
        assert np.array_equal(get(t, k2), content(k2))


def test_lru_eviction_respects_reads_and_pins(tmp_path):
    with tier(tmp_path, blocks=4) as t:
        keys = [put(t, i) for i in range(4)]
        get(t, keys[0])                      # 0 is now most recent; 1 is LRU
        put(t, 10)
        assert not t.contains(keys[1]) and t.contains(keys[0])
        assert t.stats()["evictions"] >= 1
        assert t.stats()["blocks"] <= 4
    # LRU order (now 2, 3, 0, 10) survives a restart.
    with tier(tmp_path, blocks=4) as t:
        put(t, 11)
        assert not t.contains(keys[2]) and t.contains(keys[3]) and t.contains(keys[0])


def test_pinned_block_is_never_evicted(tmp_path):
    gate = threading.Event()

    class SlowRead:
        def __init__(self, io):
            self.io = io

        def __getattr__(self, name):
            return getattr(self.io, name)

        def preadv(self, fd, bufs, offset):
            gate.wait(10)
            return self.io.preadv(fd, bufs, offset)

    from kvplug.tiers.aligned_io import FileIO
    with tier(tmp_path, blocks=2, io=SlowRead(FileIO())) as t:
        k0, k1 = put(t, 0), put(t, 1)
        out = slot()
        reading = t.read(k0, out)             # k0 is LRU and pinned
        put(t, 2)
        assert t.contains(k0) and not t.contains(k1)
        gate.set()
        assert reading.result() and np.array_equal(out[:BLOCK], content(k0))


def test_delete(tmp_path):
    with tier(tmp_path) as t:
        key = put(t, 1)
        t.delete(key)
        t.delete(key)
        assert not t.contains(key) and t.read(key, slot()).result() is False
    with tier(tmp_path) as t:
        assert not t.contains(key) and list(t.entries()) == []


def test_concurrent_reads_and_writes(tmp_path):
    with tier(tmp_path, blocks=64, io_threads=4) as t:
        blocks = [block(i) for i in range(48)]
        bufs = [slot(fill=content(k)) for k, _, _ in blocks]
        futs = [t.write(k, p, tok, b) for (k, p, tok), b in zip(blocks, bufs)]
        dup = t.write(*blocks[0], bufs[0])    # same key while in flight: no second write
        assert all(f.result() for f in futs) and dup.result()
        t.flush()
        outs = [slot() for _ in blocks]
        futs = [t.read(k, o) for (k, _, _), o in zip(blocks, outs)]
        assert all(f.result() for f in futs)
        for (k, _, _), o in zip(blocks, outs):
            assert np.array_equal(o[:BLOCK], content(k))
        assert t.stats()["writes"] == 48


def test_one_owner_per_directory(tmp_path):
    with tier(tmp_path):
        with pytest.raises(DirectoryBusy, match=str(tmp_path)):
            tier(tmp_path)
    tier(tmp_path).close()  # released at close


def test_foreign_fingerprint_is_not_served_but_kept(tmp_path):
    with tier(tmp_path) as t:
        key = put(t, 1)
    with tier(tmp_path, fingerprint=b"other-model-fp!!") as t:
        assert not t.contains(key) and list(t.entries()) == []
        assert t.read(key, slot()).result() is False
        assert t.stats()["foreign_blocks"] == 1
    with tier(tmp_path) as t:
        assert np.array_equal(get(t, key), content(key))


def test_geometry_change_starts_empty(tmp_path):
    with tier(tmp_path) as t:
        put(t, 1)
    with SSDTier(str(tmp_path), 1 << 20, BLOCK * 2, FP) as t:
        assert t.stats()["blocks"] == 0 and list(t.entries()) == []


def test_capacity_shrink_drops_blocks_past_it(tmp_path):
    with tier(tmp_path, blocks=8) as t:
        keys = [put(t, i) for i in range(8)]
    with tier(tmp_path, blocks=3) as t:
        kept = [k for k in keys if t.contains(k)]
        assert len(kept) <= 3
        for k in kept:
            assert np.array_equal(get(t, k), content(k))


def test_o_direct_modes(tmp_path):
    supported = probe_direct(str(tmp_path)) is None
    with tier(tmp_path / "a", o_direct="off") as t:
        assert t.stats()["o_direct"] == 0
        assert np.array_equal(get(t, put(t, 1)), content(block(1)[0]))
    with tier(tmp_path / "b", o_direct="auto") as t:
        assert t.stats()["o_direct"] == int(supported)
    if supported:
        with tier(tmp_path / "c", o_direct="on") as t:
            assert t.stats()["o_direct"] == 1
    with pytest.raises(ValueError, match="o_direct"):
        tier(tmp_path / "d", o_direct="maybe")


def test_o_direct_on_fails_clearly_where_unsupported(tmp_path, monkeypatch):
    import kvplug.tiers.ssd as ssd
    monkeypatch.setattr(ssd, "probe_direct", lambda path: "EINVAL: Invalid argument")
    with pytest.raises(OSError, match="does not support O_DIRECT"):
        tier(tmp_path, o_direct="on")
    with tier(tmp_path, o_direct="auto") as t:
        assert t.stats()["o_direct"] == 0
        assert np.array_equal(get(t, put(t, 1)), content(block(1)[0]))


def test_too_small_capacity_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="capacity_bytes"):
        SSDTier(str(tmp_path), STRIDE - 1, BLOCK, FP)


def test_bad_buffer_raises_from_future(tmp_path):
    with tier(tmp_path) as t:
        key, parent, tokens = block(1)
        with pytest.raises(ValueError):
            t.write(key, parent, tokens, np.zeros(10, np.uint8)).result()
        assert t.stats()["blocks"] == 0
        put(t, 1)
        with pytest.raises(ValueError):
            t.read(key, np.zeros(10, np.uint8)).result()


def test_manifest_row_format(tmp_path):
    """The manifest is plain SQLite columns: readable without kvplug, no pickle."""
    import sqlite3
    with tier(tmp_path) as t:
        key = put(t, 1)
    conn = sqlite3.connect(os.path.join(tmp_path, "manifest.sqlite3"))
    row = conn.execute("SELECT key, tokens, fingerprint, format, segment, slot FROM blocks").fetchone()
    assert row[0] == key and np.frombuffer(row[1], "<i8").tolist() == block(1)[2].tolist()
    assert row[2] == FP and row[3] == FORMAT_VERSION and row[4] == 0
    conn.close()


@pytest.mark.parametrize("n", [0, 1, 4095, 1 << 16, (2 << 20) + 7])
def test_checksum_is_xxh3_64(n):
    """The GIL-free path (xxhash's C function through ctypes) and the binding agree."""
    import xxhash
    from kvplug.tiers.slot_header import checksum
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    want = xxhash.xxh3_64_intdigest(data)
    assert checksum(memoryview(data)) % (1 << 64) == want


def test_segments_coalesce_runs_of_consecutive_slots(tmp_path):
    """One syscall per run of consecutive slots within a segment; results per item."""
    from kvplug.tiers.aligned_io import FileIO, aligned_buffer
    from kvplug.tiers.segments import Segments

    calls = []

    class Counting(FileIO):
        def pwritev(self, fd, bufs, offset):
            calls.append((offset // 4096, len(bufs)))
            return super().pwritev(fd, bufs, offset)

    seg = Segments(str(tmp_path), 4096, 4, direct=False, io=Counting(), max_in_flight=2)
    slots = [5, 3, 4, 7, 8, 0]  # runs: 0 | 3 | 4 5 | 7 | 8 (4 slots a segment: 3|4 and 7|8 split)
    bufs = [aligned_buffer(4096) for _ in slots]
    assert seg.transfer(True, list(zip(slots, bufs))) == [4096] * len(slots)
    assert sorted(n for _, n in calls) == [1, 1, 1, 1, 2]
    assert sorted(os.listdir(tmp_path)) == ["segment-00000.kvs", "segment-00001.kvs", "segment-00002.kvs"]
    seg.close()
