"""Injected I/O faults: failed writes and misses, counted, logged once per kind, then business as usual."""

from __future__ import annotations

import errno
import logging
import sqlite3

import numpy as np
import pytest

from kvplug.tiers.aligned_io import FaultyIO, FileIO
from kvplug.tiers.ssd import SSDTier
from kvplug.tiers.slots import slot_stride
from ssd_helpers import BLOCK, FP, block, content, slot

STRIDE = slot_stride(BLOCK)


def tier(path, blocks=8, io=None) -> SSDTier:
    return SSDTier(str(path), blocks * STRIDE, BLOCK, FP, io=io)


def put(t: SSDTier, i: int):
    key, parent, tokens = block(i)
    return t.write(key, parent, tokens, slot(fill=content(key))).result()


def reads_exact(t: SSDTier, i: int) -> bool:
    key = block(i)[0]
    out = slot()
    if not t.read(key, out).result():
        return False
    assert np.array_equal(out[:BLOCK], content(key))
    return True


def warnings(caplog, kind: str) -> int:
    return sum(kind in r.getMessage() for r in caplog.records if r.name == "kvplug")


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_write_fault(tmp_path, caplog, err):
    io = FaultyIO()
    name = f"write_{errno.errorcode[err]}"
    with caplog.at_level(logging.WARNING, logger="kvplug"), tier(tmp_path, io=io) as t:
        io.fail("write", err, times=3)
        assert [put(t, i) for i in range(3)] == [False] * 3
        s = t.stats()
        assert s[f"io_faults_{name}"] == 3 and s["io_faults"] == 3 and s["write_failures"] == 3
        assert s["blocks"] == 0 and not t.contains(block(0)[0])
        assert warnings(caplog, name) == 1
        # Healed: it keeps working, and the failed writes leaked no slot.
        assert all(put(t, i) for i in range(8))
        assert all(reads_exact(t, i) for i in range(8))
        assert t.stats()["evictions"] == 0
    with tier(tmp_path) as t:  # nothing half-written was recorded
        assert all(reads_exact(t, i) for i in range(8))
        assert t.stats()["corruptions"] == 0


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
def test_read_fault_is_a_miss_and_drops_the_block(tmp_path, caplog, err):
    io = FaultyIO()
    name = f"read_{errno.errorcode[err]}"
    with caplog.at_level(logging.WARNING, logger="kvplug"), tier(tmp_path, io=io) as t:
        assert all(put(t, i) for i in range(4))
        io.fail("read", err, times=2)
        assert not reads_exact(t, 0) and not reads_exact(t, 1)
        assert not t.contains(block(0)[0])
        assert reads_exact(t, 2) and reads_exact(t, 3)
        s = t.stats()
        assert s[f"io_faults_{name}"] == 2 and s["read_misses"] == 2 and s["blocks"] == 2
        assert warnings(caplog, name) == 1
        assert put(t, 0) and reads_exact(t, 0)  # the dropped block can be stored again


def test_persistent_faults_then_heal(tmp_path, caplog):
    io = FaultyIO()
    with caplog.at_level(logging.WARNING, logger="kvplug"), tier(tmp_path, io=io) as t:
        assert all(put(t, i) for i in range(4))
        io.fail("write", errno.ENOSPC)
        io.fail("read", errno.EIO)
        assert not any(put(t, i) for i in range(4, 40))
        assert not any(reads_exact(t, i) for i in range(4))
        assert warnings(caplog, "write_ENOSPC") == 1 and warnings(caplog, "read_EIO") == 1
        io.heal()
        assert all(put(t, i) for i in range(8)) and all(reads_exact(t, i) for i in range(8))


def test_intermittent_faults_under_concurrency(tmp_path):
    """Every third syscall fails, with many I/Os in flight: whatever succeeded reads back exactly."""

    class Flaky(FileIO):
        calls = 0

        def _maybe_fail(self):
            Flaky.calls += 1
            if Flaky.calls % 3 == 0:
                raise OSError(errno.EIO, "injected")

        def pwritev(self, fd, bufs, offset):
            self._maybe_fail()
            return super().pwritev(fd, bufs, offset)

        def preadv(self, fd, bufs, offset):
            self._maybe_fail()
            return super().preadv(fd, bufs, offset)

    with tier(tmp_path, blocks=32, io=Flaky()) as t:
        blocks = [block(i) for i in range(64)]
        bufs = [slot(fill=content(k)) for k, _, _ in blocks]
        outs = [slot() for _ in blocks]
        wrote, got = [], []
        for wave in range(0, 64, 8):  # waves of 8 in flight: several syscalls, so some fail
            wave_blocks = list(zip(blocks, bufs))[wave:wave + 8]
            wrote += [f.result() for f in [t.write(k, p, tok, b) for (k, p, tok), b in wave_blocks]]
        for wave in range(0, 64, 8):
            wave_blocks = list(zip(blocks, outs))[wave:wave + 8]
            got += [f.result() for f in [t.read(k, o) for (k, _, _), o in wave_blocks]]
        assert 0 < sum(wrote) < 64 and 0 < sum(got)
        for (k, _, _), o, ok in zip(blocks, outs, got):
            assert not ok or np.array_equal(o[:BLOCK], content(k))
        s = t.stats()
        assert s["io_faults"] == s["io_faults_write_EIO"] + s.get("io_faults_read_EIO", 0)
        assert s["blocks"] <= 32


def test_short_write_is_a_failed_write(tmp_path):
    class Short(FileIO):
        def pwritev(self, fd, bufs, offset):
            return super().pwritev(fd, [bufs[0][:4096]], offset)

    with tier(tmp_path, io=Short()) as t:
        assert not put(t, 0) and t.stats()["io_faults_write_ENOSPC"] == 1


def test_manifest_failure_is_a_failed_write(tmp_path, monkeypatch):
    with tier(tmp_path) as t:
        def broken(*a, **k):
            raise sqlite3.OperationalError("disk I/O error")
        monkeypatch.setattr(t._manifest, "insert", broken)
        assert not put(t, 0)
        assert t.stats()["io_faults_manifest_OperationalError"] == 1
        monkeypatch.undo()
        assert all(put(t, i) for i in range(8))  # its slot was given back


def test_an_unexpected_error_in_an_io_thread_turns_the_tier_off_not_the_thread(tmp_path, caplog, monkeypatch):
    t = tier(tmp_path)
    assert put(t, 0)
    monkeypatch.setattr(SSDTier, "_read_batch", lambda self, ops: 1 / 0)  # a bug, not an I/O error
    with caplog.at_level(logging.ERROR, logger="kvplug"):
        fut = t.read(block(0)[0], slot())
        with pytest.raises(ZeroDivisionError):
            fut.result(timeout=5)  # the caller hears of it: no future is left hanging
    assert t.degraded and t.stats()["io_thread_errors"] == 1
    assert sum("tier is off" in r.getMessage() for r in caplog.records) == 1  # logged once
    key, parent, tokens = block(1)
    with pytest.raises(RuntimeError, match="is off"):  # later transfers fail at once: callers recompute
        t.write(key, parent, tokens, slot()).result(timeout=5)
    assert t.stats()["degraded_ops"] == 1
    t.close()


def test_close_returns_within_its_bound_on_a_hung_disk(tmp_path, monkeypatch):
    import threading
    import time

    from kvplug.tiers.segments import Segments

    t = tier(tmp_path)
    hang = threading.Event()
    transfer = Segments.transfer
    monkeypatch.setattr(Segments, "transfer", lambda self, *a, **k: (hang.wait(), transfer(self, *a, **k))[1])
    key, parent, tokens = block(0)
    fut = t.write(key, parent, tokens, slot(fill=content(key)))
    start = time.monotonic()
    t.close(timeout=0.5)
    assert time.monotonic() - start < 3 and not fut.done()
    hang.set()  # the disk comes back: the thread left behind finishes on its own
    fut.result(timeout=5)
