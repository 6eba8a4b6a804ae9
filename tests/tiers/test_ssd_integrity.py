"""Keyed integrity (a MAC in each slot header) and the eviction hook (on_drop).

Without a key, a writer of the directory can plant KV that every keyless
check accepts (these tests show it); with one, such a block is a counted
miss. The key appears in no log, message or repr.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3

import numpy as np
import pytest

from kvplug.keys import block_key
from kvplug.tiers import slot_header
from kvplug.tiers.manifest import Row
from kvplug.tiers.ssd import SSDTier
from kvplug.tiers.slots import slot_stride
from ssd_helpers import BLOCK, FP, block, content, slot

STRIDE = slot_stride(BLOCK)
CAPACITY = 16 * STRIDE
N = 4
KEYS = [block(i)[0] for i in range(N)]
SECRET = b"kvplug-test-integrity-secret-7f3a9c"
OTHER = b"another-secret-of-at-least-16-bytes"
COLUMNS = ", ".join(Row._fields)
EVIL = np.full(BLOCK, 0xEE, np.uint8)


def opens(path, key=None, **kw) -> SSDTier:
    return SSDTier(str(path), kw.pop("capacity", CAPACITY), BLOCK, FP, block_tokens=4, integrity_key=key, **kw)


def fill(path, key=None, n=N) -> None:
    with opens(path, key) as tier:
        for i in range(n):
            k, parent, tokens = block(i)
            assert tier.write(k, parent, tokens, slot(fill=content(k))).result()


def read(tier: SSDTier, key: bytes) -> np.ndarray | None:
    out = slot()
    return out[:BLOCK].copy() if tier.read(key, out).result() else None


def row_of(path, key) -> Row:
    conn = sqlite3.connect(path / "manifest.sqlite3")
    row = Row(*conn.execute(f"SELECT {COLUMNS} FROM blocks WHERE key = ?", (key,)).fetchone())
    conn.close()
    return row


def put_row(path, row: Row, replacing: bytes) -> None:
    conn = sqlite3.connect(path / "manifest.sqlite3")
    with conn:
        conn.execute("DELETE FROM blocks WHERE key = ?", (replacing,))
        conn.execute(f"INSERT INTO blocks ({COLUMNS}, row_check) VALUES (?,?,?,?,?,?,?,?,?,?)", row.with_check())
    conn.close()


def plant(path, victim: bytes, data: np.ndarray, *, as_key: bytes | None = None, parent: bytes = FP,
          tokens: np.ndarray | None = None, mac_key: bytes | None = None, keep_bytes: bool = False) -> bytes:
    """What a writer of the directory can do without the secret: rewrite a slot (bytes, header,
    checksum: all public) and a consistent manifest row, optionally under another key and tokens."""
    row = row_of(path, victim)
    tok = row.tokens if tokens is None else tokens.astype("<i8").tobytes()
    key = as_key or victim
    file = path / f"segment-{row.segment:05d}.kvs"
    with open(file, "r+b") as f:
        f.seek(row.slot * STRIDE)
        buf = bytearray(f.read(STRIDE))
        if keep_bytes:  # relabel: only the header's key changes; flags, checksum and MAC stay
            fields = list(slot_header.HEADER.unpack_from(buf, BLOCK))
            fields[4], csum = key, fields[6]
            slot_header.HEADER.pack_into(buf, BLOCK, *fields)
        else:
            buf[:BLOCK] = data.tobytes()
            meta = slot_header.meta_digest(key, parent, tok)
            csum = slot_header.pack(memoryview(buf), BLOCK, FP, key, mac_key and slot_header.derive_key(mac_key), meta)
        f.seek(row.slot * STRIDE)
        f.write(buf)
    put_row(path, row._replace(key=key, parent=parent, tokens=tok, checksum=csum), replacing=victim)
    return key


@pytest.fixture
def signed(tmp_path):
    path = tmp_path / "signed"
    fill(path, SECRET)
    return path


@pytest.fixture
def unsigned(tmp_path):
    path = tmp_path / "unsigned"
    fill(path)
    return path


def test_round_trip_with_a_key(signed):
    with opens(signed, SECRET) as tier:
        for k in KEYS:
            assert np.array_equal(read(tier, k), content(k))
        s = tier.stats()
        assert s["integrity"] == 1 and s["corruptions"] == 0 and s["read_hits"] == N


def test_without_a_key_a_planted_block_is_served(unsigned):
    """The documented limit of the keyless checks: this is what the key is for."""
    plant(unsigned, KEYS[0], EVIL)
    with opens(unsigned) as tier:
        assert np.array_equal(read(tier, KEYS[0]), EVIL)
        assert tier.stats()["corruptions"] == 0


@pytest.mark.parametrize("attacker_key,reason", [(None, "mac_missing"), (OTHER, "mac")])
def test_with_a_key_a_planted_block_is_a_counted_miss(signed, attacker_key, reason):
    plant(signed, KEYS[0], EVIL, mac_key=attacker_key)
    dropped = []
    with opens(signed, SECRET, on_drop=dropped.extend) as tier:
        assert read(tier, KEYS[0]) is None
        s = tier.stats()
        assert s["corruptions"] == 1 and s[f"corruptions_{reason}"] == 1 and s["read_misses"] == 1
        assert not tier.contains(KEYS[0]) and dropped == [KEYS[0]]
        for k in KEYS[1:]:
            assert np.array_equal(read(tier, k), content(k))
    with opens(signed, SECRET) as tier:  # and it stays dropped
        assert not tier.contains(KEYS[0])


def test_with_a_key_a_relabelled_block_is_a_miss(signed, unsigned):
    """Genuine bytes under other tokens (the header's key and the row rewritten, the MAC kept):
    served without a key, a miss with one, since the MAC binds the key, parent and tokens."""
    tokens = np.arange(900, 904)
    forged = block_key(FP, tokens)
    for path, key in ((unsigned, None), (signed, SECRET)):
        plant(path, KEYS[1], EVIL, as_key=forged, tokens=tokens, keep_bytes=True)
        with opens(path, key) as tier:
            got = read(tier, forged)
            if key is None:
                assert np.array_equal(got, content(KEYS[1]))
            else:
                assert got is None and "corruptions_mac_missing" not in tier.stats()
                assert tier.stats()["corruptions_mac"] == 1


def test_forged_mac_flag_with_random_mac_is_a_miss(signed):
    row = row_of(signed, KEYS[2])
    file = signed / f"segment-{row.segment:05d}.kvs"
    with open(file, "r+b") as f:  # a random MAC in place of the real one
        f.seek(row.slot * STRIDE + BLOCK + slot_header.CHECKED_BYTES)
        f.write(os.urandom(slot_header.MAC_BYTES))
    with opens(signed, SECRET) as tier:
        assert read(tier, KEYS[2]) is None and tier.stats()["corruptions_mac"] == 1


@pytest.mark.parametrize("writer,reader,reason", [(None, SECRET, "mac_missing"), (SECRET, None, "mac_unexpected"),
                                                  (SECRET, OTHER, "mac")])
def test_writer_and_reader_must_hold_the_same_key(tmp_path, writer, reader, reason):
    """Blocks written without the key are misses with it; blocks written with a key are
    misses without it (nothing could check them); another key is a miss too."""
    path = tmp_path / "ssd"
    fill(path, writer)
    with opens(path, reader) as tier:
        assert all(read(tier, k) is None for k in KEYS)
        s = tier.stats()
        assert s["corruptions"] == N and s[f"corruptions_{reason}"] == N
        k, parent, tokens = block(0)  # and it goes on with the reader's own blocks
        assert tier.write(k, parent, tokens, slot(fill=content(k))).result()
        assert np.array_equal(read(tier, k), content(k))


def test_the_key_appears_in_no_log_message_or_repr(signed, caplog):
    plant(signed, KEYS[0], EVIL)
    secrets = [SECRET, slot_header.derive_key(SECRET)]
    needles = [n for s in secrets for n in (s, s.hex(), repr(s), s.decode("latin-1"))]

    def boom(keys):
        raise RuntimeError("owner bug")

    with caplog.at_level(logging.DEBUG):
        with opens(signed, SECRET, on_drop=boom) as tier:
            assert read(tier, KEYS[0]) is None
            texts = [repr(tier), str(tier), str(tier.stats())]
        with pytest.raises(ValueError) as e:
            opens(signed, "not bytes")
        texts.append(str(e.value))
    texts += [r.getMessage() + (r.exc_text or "") for r in caplog.records]
    assert any("dropped" in t for t in texts)  # the failure was logged
    for text in texts:
        for needle in needles:
            assert str(needle) not in text


# -- on_drop ---------------------------------------------------------------------

def test_on_drop_reports_lru_evictions_outside_the_locks(tmp_path):
    calls, lock_free = [], []
    holder = {}

    def on_drop(keys):
        tier = holder["tier"]
        for lock in (tier._index.lock, tier._manifest._lock):
            ok = lock.acquire(timeout=5)
            lock_free.append(ok)
            if ok:
                lock.release()
        calls.append(list(keys))

    with opens(tmp_path / "ssd", capacity=4 * STRIDE, on_drop=on_drop) as tier:
        holder["tier"] = tier
        keys = []
        for i in range(6):
            k, parent, tokens = block(i)
            assert tier.write(k, parent, tokens, slot(fill=content(k))).result()
            keys.append(k)
        assert [k for c in calls for k in c] == keys[:2] and all(lock_free)
        assert not any(tier.contains(k) for k in keys[:2]) and tier.stats()["evictions"] == 2
        tier.delete(keys[2])  # the owner's own deletes are not reported back
        assert [k for c in calls for k in c] == keys[:2]


def test_on_drop_reports_corrupt_blocks(unsigned):
    row = row_of(unsigned, KEYS[3])
    with open(unsigned / f"segment-{row.segment:05d}.kvs", "r+b") as f:
        f.seek(row.slot * STRIDE + 7)
        f.write(b"\x00\xff")
    dropped = []
    with opens(unsigned, on_drop=dropped.extend) as tier:
        assert read(tier, KEYS[3]) is None and dropped == [KEYS[3]]


def test_on_drop_reports_start_up_drops_from_the_constructor(tmp_path, unsigned):
    dropped = []
    with opens(unsigned, capacity=2 * STRIDE, on_drop=dropped.extend) as tier:
        gone = [k for k in KEYS if not tier.contains(k)]
        assert len(gone) == N - 2 and sorted(dropped) == sorted(gone)
        assert tier.stats()["dropped_capacity"] == N - 2


def test_a_failing_on_drop_is_counted_and_the_tier_goes_on(tmp_path, caplog):
    def boom(keys):
        raise RuntimeError("owner bug")

    with caplog.at_level(logging.WARNING, logger="kvplug"):
        with opens(tmp_path / "ssd", capacity=2 * STRIDE, on_drop=boom) as tier:
            for i in range(5):
                k, parent, tokens = block(i)
                assert tier.write(k, parent, tokens, slot(fill=content(k))).result()
                assert np.array_equal(read(tier, k), content(k))
            assert tier.stats()["on_drop_errors"] == 3 and not tier.degraded
    assert sum("on_drop" in r.getMessage() for r in caplog.records) == 1


def test_copy_of_a_signed_directory_keeps_working(signed, tmp_path):
    """A signed block is bound to its content, not its place: a copied directory serves it."""
    copy = tmp_path / "copy"
    shutil.copytree(signed, copy)
    with opens(copy, SECRET) as tier:
        assert all(np.array_equal(read(tier, k), content(k)) for k in KEYS)
