"""Damage segment files and the manifest: every case is a counted miss, never wrong bytes."""

from __future__ import annotations

import os
import random
import shutil
import sqlite3

import numpy as np
import pytest

from kvplug.keys import block_key
from kvplug.tiers.manifest import Row
from kvplug.tiers.slot_header import CHECKED_BYTES
from kvplug.tiers.ssd import SSDTier
from kvplug.tiers.slots import slot_stride
from ssd_helpers import BLOCK, FP, block, content, slot

STRIDE = slot_stride(BLOCK)
N = 12
CAPACITY = 32 * STRIDE
CHECKED = BLOCK + CHECKED_BYTES  # every byte of a slot that a keyless read verifies
KEYS = [block(i)[0] for i in range(N)]
COLUMNS = ", ".join(Row._fields)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A closed tier directory holding N blocks (manifest checkpointed, no WAL)."""
    path = tmp_path_factory.mktemp("pristine")
    with SSDTier(str(path), CAPACITY, BLOCK, FP) as tier:
        for i in range(N):
            key, parent, tokens = block(i)
            assert tier.write(key, parent, tokens, slot(fill=content(key))).result()
    return path


@pytest.fixture
def path(pristine, tmp_path):
    dst = tmp_path / "ssd"
    shutil.copytree(pristine, dst)
    return dst


def where(path, key) -> tuple[str, int]:
    """(segment file, byte offset) of a block's slot, from the manifest."""
    conn = sqlite3.connect(os.path.join(path, "manifest.sqlite3"))
    seg, s = conn.execute("SELECT segment, slot FROM blocks WHERE key = ?", (key,)).fetchone()
    conn.close()
    return os.path.join(path, f"segment-{seg:05d}.kvs"), s * STRIDE


def flip(file: str, offset: int, mask: int = 0x5A) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def read_all(tier: SSDTier) -> tuple[set[bytes], set[bytes]]:
    """(hits, misses) over all test blocks; a hit must hold exactly the stored bytes."""
    hits, misses = set(), set()
    for key in KEYS:
        out = slot()
        if tier.read(key, out).result():
            assert np.array_equal(out[:BLOCK], content(key)), "wrong bytes returned"
            hits.add(key)
        else:
            misses.add(key)
    for key, parent, tokens in tier.entries():
        assert key == block_key(parent, tokens)
    return hits, misses


# -- segment files ----------------------------------------------------------

HEADER_FIELDS = {  # offset of a byte inside each header field -> reason counted
    "magic": (0, "header"), "format": (8, "foreign"), "reserved": (12, "header"),
    "fingerprint": (16, "foreign"), "key": (32, "header"), "length": (48, "header"),
    "checksum": (56, "header"),
}


@pytest.mark.parametrize("where_", ["data_first", "data_last", *HEADER_FIELDS])
def test_flipped_slot_byte_is_a_counted_miss(path, where_):
    victim = KEYS[3]
    file, base = where(path, victim)
    if where_ == "data_first":
        offset, reason = 0, "checksum"
    elif where_ == "data_last":
        offset, reason = BLOCK - 1, "checksum"
    else:
        offset, reason = BLOCK + HEADER_FIELDS[where_][0], HEADER_FIELDS[where_][1]
    flip(file, base + offset)
    with SSDTier(str(path), CAPACITY, BLOCK, FP) as tier:
        hits, misses = read_all(tier)
        assert misses == {victim}
        s = tier.stats()
        assert s["corruptions"] == 1 and s[f"corruptions_{reason}"] == 1
        assert not tier.contains(victim)
    with SSDTier(str(path), CAPACITY, BLOCK, FP) as tier:  # the drop is persistent
        assert victim not in {k for k, _, _ in tier.entries()}
        assert tier.stats()["blocks"] == N - 1


def test_truncated_segment(path):
    file, _ = where(path, KEYS[0])
    order = sorted(KEYS, key=lambda k: where(path, k)[1])
    cut = 5 * STRIDE + BLOCK // 2          # inside the 6th slot
    os.truncate(file, cut)
    with SSDTier(str(path), CAPACITY, BLOCK, FP) as tier:
        hits, misses = read_all(tier)
        assert hits == set(order[:5]) and misses == set(order[5:])
        assert tier.stats()["corruptions_truncated"] == N - 5


def test_deleted_segment(path):
    os.unlink(where(path, KEYS[0])[0])
    with SSDTier(str(path), CAPACITY, BLOCK, FP) as tier:
        hits, misses = read_all(tier)
        assert not hits and tier.stats()["corruptions"] == N
        # and it keeps working
        key, parent, tokens = block(0)
        assert tier.write(key, parent, tokens, slot(fill=content(key))).result()
        assert read_all(tier)[0] == {key}


def test_stale_slot_copied_over_another(path):
    """A slot holding another (valid!) block is caught by the header's key."""
    fa, oa = where(path, KEYS[1])
    fb, ob = where(path, KEYS[2])
    with open(fa, "rb") as f:
        f.seek(oa)
        a = f.read(STRIDE)
    with open(fb, "r+b") as f:
        f.seek(ob)
        f.write(a)
    with SSDTier(str(path), CAPACITY, BLOCK, FP) as tier:
        hits, misses = read_all(tier)
        assert misses == {KEYS[2]} and tier.stats()["corruptions_header"] == 1


def test_random_flips_in_segments(path, tmp_path):
    """Any flip in the verified part of a slot is a counted miss; padding does not matter."""
    rng = random.Random(7)
    file, _ = where(path, KEYS[0])
    slot_of = {where(path, k)[1] // STRIDE: k for k in KEYS}
    for trial in range(30):
        trial_path = tmp_path / f"t{trial}"
        shutil.copytree(path, trial_path)
        damaged = set()
        for _ in range(rng.randint(1, 4)):
            offset = rng.randrange(os.path.getsize(file))
            flip(str(trial_path / os.path.basename(file)), offset, mask=1 << rng.randrange(8))
            if offset % STRIDE < CHECKED:
                damaged.add(slot_of[offset // STRIDE])
        with SSDTier(str(trial_path), CAPACITY, BLOCK, FP) as tier:
            hits, misses = read_all(tier)
            assert misses == damaged and tier.stats()["corruptions"] == len(damaged)


# -- the manifest -------------------------------------------------------------

def manifest(path) -> str:
    return os.path.join(path, "manifest.sqlite3")


def find(file: str, needle: bytes) -> int:
    data = open(file, "rb").read()
    assert data.count(needle) == 1
    return data.index(needle)


def test_unreadable_manifest_starts_empty_and_keeps_working(path):
    flip(manifest(path), 0)                # "SQLite format 3\0" magic
    with SSDTier(str(path), CAPACITY, BLOCK, FP) as tier:
        hits, _ = read_all(tier)
        assert not hits and tier.stats()["manifest_resets"] == 1
        for i in range(N + 5):             # reuses the old slots safely
            key, parent, tokens = block(100 + i)
            assert tier.write(key, parent, tokens, slot(fill=content(key))).result()
        assert tier.stats()["blocks"] == N + 5
    assert os.path.exists(manifest(path) + ".corrupt")


@pytest.mark.parametrize("size", [0, 100, 4096, 8192 + 17])
def test_truncated_manifest(path, size):
    os.truncate(manifest(path), size)
    with SSDTier(str(path), CAPACITY, BLOCK, FP) as tier:
        read_all(tier)


def test_garbage_wal_is_ignored(path):
    with open(manifest(path) + "-wal", "wb") as f:
        f.write(os.urandom(40_000))
    with SSDTier(str(path), CAPACITY, BLOCK, FP) as tier:
        hits, _ = read_all(tier)
        assert hits == set(KEYS)


@pytest.mark.parametrize("column", ["key", "parent", "tokens"])
def test_flipped_row_identity_is_dropped(path, column):
    """A row whose columns no longer match its row check is dropped at start."""
    victim = 5
    key, parent, tokens = block(victim)
    needle = {"key": key, "parent": None, "tokens": tokens.astype("<i8").tobytes()}[column]
    if needle is None:                     # every first block shares FP as parent: chain one
        with SSDTier(str(path), CAPACITY, BLOCK, FP) as tier:
            key, parent, tokens = block(999, parent=KEYS[victim])
            assert tier.write(key, parent, tokens, slot(fill=content(key))).result()
        needle = parent
        data = open(manifest(path), "rb").read()
        offset = [i for i in range(len(data)) if data.startswith(needle, i)]
        offset = [o for o in offset if data[o - 16:o] != needle][-1]  # the parent column, not a key
    else:
        offset = find(manifest(path), needle)
    flip(manifest(path), offset + 3)
    with SSDTier(str(path), CAPACITY, BLOCK, FP) as tier:
        s = tier.stats()
        assert s["corruptions_manifest"] == 1 and s["blocks"] == N - (column != "parent")
        read_all(tier)


def test_flipped_row_checksum_is_a_counted_miss(path):
    victim = KEYS[4]
    conn = sqlite3.connect(manifest(path))
    csum = conn.execute("SELECT checksum FROM blocks WHERE key = ?", (victim,)).fetchone()[0]
    conn.close()
    flip(manifest(path), find(manifest(path), csum.to_bytes(8, "big", signed=True)) + 7)
    with SSDTier(str(path), CAPACITY, BLOCK, FP) as tier:
        hits, misses = read_all(tier)
        assert misses == {victim} and tier.stats()["corruptions_manifest"] == 1


def test_consistent_row_pointing_at_another_slot(path):
    """A row that passes its own check but names the wrong slot is caught by the slot header."""
    conn = sqlite3.connect(manifest(path))
    with conn:
        other = conn.execute("SELECT slot FROM blocks WHERE key = ?", (KEYS[1],)).fetchone()[0]
        conn.execute("DELETE FROM blocks WHERE key = ?", (KEYS[1],))
        row = Row(*conn.execute(f"SELECT {COLUMNS} FROM blocks WHERE key = ?", (KEYS[2],)).fetchone())
        conn.execute("DELETE FROM blocks WHERE key = ?", (KEYS[2],))
        conn.execute(f"INSERT INTO blocks ({COLUMNS}, row_check) VALUES (?,?,?,?,?,?,?,?,?,?)",
                     row._replace(slot=other).with_check())
    conn.close()
    with SSDTier(str(path), CAPACITY, BLOCK, FP) as tier:
        hits, misses = read_all(tier)
        assert misses == {KEYS[1], KEYS[2]} and tier.stats()["corruptions_header"] == 1


def test_random_flips_in_manifest(path, tmp_path):
    """Whatever byte is hit, the tier starts, and serves exact bytes or misses."""
    rng = random.Random(11)
    size = os.path.getsize(manifest(path))
    for trial in range(80):
        trial_path = tmp_path / f"t{trial}"
        shutil.copytree(path, trial_path)
        for _ in range(rng.randint(1, 8)):
            flip(manifest(trial_path), rng.randrange(size), mask=1 << rng.randrange(8))
        with SSDTier(str(trial_path), CAPACITY, BLOCK, FP) as tier:
            hits, misses = read_all(tier)
            s = tier.stats()
            if not s["manifest_resets"]:  # else rows were salvaged, and lost ones are not each counted
                assert len(misses) == s["corruptions"]
            key, parent, tokens = block(500)
            assert tier.write(key, parent, tokens, slot(fill=content(key))).result()
            out = slot()
            assert tier.read(key, out).result() and np.array_equal(out[:BLOCK], content(key))
