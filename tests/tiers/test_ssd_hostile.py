"""A hostile SSD directory: links, foreign owners, loose modes, crafted manifest rows.

Directory-level problems stop start-up with a message naming the path, what
is wrong and what would be accepted; crafted rows are dropped and counted.
Every test checks that nothing outside the directory changed: the files a
link points at keep their bytes and mtime, and nothing appears beside them.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import stat

import numpy as np
import pytest

from kvplug.keys import block_key
from kvplug.tiers import ssd as ssd_module
from kvplug.tiers.manifest import Row
from kvplug.tiers.ssd import SSDTier
from kvplug.tiers.ssd_dir import UnsafeDirectory
from kvplug.tiers.slots import slot_stride
from ssd_helpers import BLOCK, FP, block, content, slot

STRIDE = slot_stride(BLOCK)
N = 6
CAPACITY = 16 * STRIDE
COLUMNS = ", ".join(Row._fields)
KEYS = [block(i)[0] for i in range(N)]


class Outside:
    """Files outside the tier's directory, watched: bytes, mtime, mode, and no new names."""

    def __init__(self, root) -> None:
        self.dir = root / "outside"
        self.dir.mkdir()
        self.file = self.dir / "sentinel"
        self.file.write_bytes(b"do not touch\n" * 1000)
        os.utime(self.file, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
        self.missing = self.dir / "not-there"
        self._before = self._snapshot()

    def _snapshot(self) -> dict:
        return {p.name: (p.read_bytes(), p.lstat().st_mtime_ns, p.lstat().st_mode) for p in self.dir.iterdir()}

    def unchanged(self) -> None:
        assert self._snapshot() == self._before, "a file outside the SSD directory changed"


@pytest.fixture
def outside(tmp_path):
    return Outside(tmp_path)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    path = tmp_path_factory.mktemp("pristine") / "ssd"
    with SSDTier(str(path), CAPACITY, BLOCK, FP, block_tokens=4) as tier:
        for i in range(N):
            key, parent, tokens = block(i)
            assert tier.write(key, parent, tokens, slot(fill=content(key))).result()
    return path


@pytest.fixture
def path(pristine, tmp_path):
    dst = tmp_path / "ssd"
    shutil.copytree(pristine, dst)
    return dst


def opens(path, **kw) -> SSDTier:
    return SSDTier(str(path), CAPACITY, BLOCK, FP, block_tokens=4, **kw)


def serves_all(tier: SSDTier) -> None:
    for key in KEYS:
        out = slot()
        assert tier.read(key, out).result() and np.array_equal(out[:BLOCK], content(key))


# -- the directory ------------------------------------------------------------

def test_created_private_with_its_parents(tmp_path, outside):
    path = tmp_path / "new" / "deeper" / "ssd"
    with opens(path):
        pass
    for p in (tmp_path / "new", tmp_path / "new" / "deeper", path):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o700
    for name in os.listdir(path):
        assert stat.S_IMODE(os.lstat(path / name).st_mode) & 0o077 == 0, name
    outside.unchanged()


def test_symlinked_directory_is_refused(tmp_path, path, outside):
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(UnsafeDirectory, match=f"{re.escape(str(link))} is a symbolic link.*real directory"):
        opens(link)
    outside.unchanged()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_foreign_owned_directory_is_refused(path, outside):
    os.chown(path, 12345, 12345)
    with pytest.raises(UnsafeDirectory, match=f"{re.escape(str(path))} is owned by uid 12345.*owned by uid {os.geteuid()}"):
        opens(path)
    os.chown(path, os.geteuid(), os.getegid())
    with opens(path) as tier:  # once fixed, it starts
        serves_all(tier)
    outside.unchanged()


@pytest.mark.parametrize("mode,who", [(0o770, "group"), (0o707, "others"), (0o777, "group and others"),
                                      (0o1777, "group and others")])
def test_directory_writable_by_others_is_refused(path, outside, mode, who):
    before = sorted(os.listdir(path))
    os.chmod(path, mode)
    with pytest.raises(UnsafeDirectory, match=f"{re.escape(str(path))} is writable by {who} .*chmod go-w {re.escape(str(path))}"):
        opens(path)
    assert sorted(os.listdir(path)) == before  # refused before touching anything
    os.chmod(path, 0o755)  # readable by others is accepted (its files are 0600)
    with opens(path) as tier:
        serves_all(tier)
    outside.unchanged()


def test_a_file_as_the_directory_is_refused(tmp_path, outside):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(UnsafeDirectory, match="is not a directory"):
        opens(tmp_path / "file")
    outside.unchanged()


# -- files in it ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["LOCK", "EPOCH", "segment-00000.kvs", "segment-00007.kvs", "manifest.sqlite3",
                                  "manifest.sqlite3-wal", "manifest.sqlite3-shm", "manifest.sqlite3-journal"])
@pytest.mark.parametrize("target", ["sentinel", "missing"])
def test_symlinked_file_is_refused(path, outside, name, target):
    victim = path / name
    if victim.exists():
        victim.unlink()
    victim.symlink_to(outside.file if target == "sentinel" else outside.missing)
    with pytest.raises(UnsafeDirectory, match=f"{re.escape(str(victim))} is a symbolic link.*remove the link"):
        opens(path)
    outside.unchanged()  # neither written nor truncated, and no -wal/-shm beside the target
    victim.unlink()
    if name in ("segment-00000.kvs", "manifest.sqlite3"):
        return  # the blocks (or the rows naming them) are gone: misses, not the point here
    with opens(path) as tier:
        serves_all(tier)
    outside.unchanged()


@pytest.mark.parametrize("name", ["LOCK", "segment-00000.kvs", "manifest.sqlite3"])
def test_hard_linked_file_is_refused(path, outside, name):
    victim = path / name
    victim.unlink()
    os.link(outside.file, victim)
    with pytest.raises(UnsafeDirectory, match=f"{re.escape(str(victim))} has 2 hard links"):
        opens(path)
    outside.unchanged()


def test_fifo_as_lock_is_refused(path, outside):
    (path / "LOCK").unlink()
    os.mkfifo(path / "LOCK")
    with pytest.raises(UnsafeDirectory, match="LOCK is not a regular file"):
        opens(path)
    outside.unchanged()


def test_segment_linked_while_running_is_never_written_through(tmp_path, outside, monkeypatch):
    """A link planted after start-up: the segment is opened with O_NOFOLLOW, so the write fails (counted)."""
    monkeypatch.setattr(ssd_module, "SEGMENT_BYTES", 2 * STRIDE)  # two slots a segment
    path = tmp_path / "ssd"
    with opens(path) as tier:
        keys = []
        for i in range(2):
            key, parent, tokens = block(i)
            assert tier.write(key, parent, tokens, slot(fill=content(key))).result()
            keys.append(key)
        (path / "segment-00001.kvs").symlink_to(outside.file)
        key, parent, tokens = block(2)
        assert tier.write(key, parent, tokens, slot(fill=content(key))).result() is False
        assert tier.stats()["io_faults"] >= 1 and not tier.contains(key)
        out = slot()
        assert tier.read(keys[0], out).result() and np.array_equal(out[:BLOCK], content(keys[0]))
    outside.unchanged()


# -- crafted manifest rows ---------------------------------------------------------

def craft(path, **changes) -> bytes:
    """Insert a row made from block 0's (its slot, checksum) with ``changes``; a valid row check."""
    conn = sqlite3.connect(path / "manifest.sqlite3")
    with conn:
        row = Row(*conn.execute(f"SELECT {COLUMNS} FROM blocks WHERE key = ?", (KEYS[0],)).fetchone())
        row = row._replace(**changes)
        conn.execute(f"INSERT OR REPLACE INTO blocks ({COLUMNS}, row_check) VALUES (?,?,?,?,?,?,?,?,?,?)",
                     row.with_check())
    conn.close()
    return row.key


def tokens_of(n: int) -> bytes:
    return np.arange(100, 100 + n, dtype="<i8").tobytes()


CRAFTED = {  # name -> (changes to block 0's row, reason counted)
    "no_tokens": (lambda: dict(key=block_key(FP, []), tokens=b""), "tokens"),
    "too_many_tokens": (lambda: dict(key=block_key(FP, np.arange(100, 105)), tokens=tokens_of(5)), "tokens"),
    "ragged_tokens": (lambda: dict(key=b"r" * 16, tokens=tokens_of(2)[:-3]), "tokens"),
    "short_key": (lambda: dict(key=b"k" * 15), "key"),
    # It names block 0's slot: dropped for that here. That a key is the hash of its parent and
    # tokens is checked by the store's index at first use (tests/test_store_lazy_chain.py).
    "key_not_its_hash": (lambda: dict(key=b"x" * 16, last_access=10**9), "duplicate_slot"),
    # Tokens past int32 would widen the index's whole token matrix: such a row's chain is checked here.
    "wide_key_not_its_hash": (lambda: dict(key=b"w" * 16, tokens=np.array([2**40, 1], "<i8").tobytes()), "chain"),
    "slot_past_segment": (lambda: dict(key=block_key(FP, np.arange(100, 102)), tokens=tokens_of(2),
                                       slot=1 << 40), "slot"),
    "negative_segment": (lambda: dict(key=block_key(FP, np.arange(100, 102)), tokens=tokens_of(2),
                                      segment=-1), "slot"),
    "clock_overflow": (lambda: dict(key=block_key(FP, np.arange(100, 102)), tokens=tokens_of(2),
                                    last_access=(1 << 63) - 1), "clock"),
    "duplicate_slot": (lambda: dict(key=block_key(FP, np.arange(100, 102)), tokens=tokens_of(2),
                                    last_access=10**9), "duplicate_slot"),
    "huge_tokens": (lambda: dict(key=b"h" * 16, tokens=b"\0" * (3 << 20)), "oversized"),  # deleted unread
    "huge_parent": (lambda: dict(key=b"p" * 16, parent=b"\1" * (1 << 20)), "oversized"),
}


@pytest.mark.parametrize("name", CRAFTED)
def test_crafted_row_is_dropped_and_counted(path, outside, name):
    changes, reason = CRAFTED[name]
    bad = craft(path, **changes())
    dropped = []
    with opens(path, on_drop=dropped.extend) as tier:
        s = tier.stats()
        assert s["corruptions_manifest"] == 1 and s[f"corruptions_manifest_{reason}"] == 1
        assert {k for k, _, _ in tier.entries()} == set(KEYS)  # duplicate_slot: the older row keeps it
        serves_all(tier)
    if reason != "oversized":  # deleted unread: its key was never seen
        assert bad in dropped
    conn = sqlite3.connect(path / "manifest.sqlite3")
    assert conn.execute("SELECT COUNT(*) FROM blocks").fetchone()[0] == N  # deleted
    conn.close()
    outside.unchanged()


def test_row_past_the_end_of_the_segment_is_a_miss(path, outside):
    """A row inside the capacity whose slot the segment file does not reach: truncated, a miss."""
    key = block_key(FP, np.arange(100, 102))
    craft(path, key=key, tokens=tokens_of(2), slot=15)
    with opens(path) as tier:
        assert tier.contains(key) and tier.read(key, slot()).result() is False
        assert tier.stats()["corruptions_truncated"] == 1 and not tier.contains(key)
        serves_all(tier)
    outside.unchanged()


def test_row_past_the_capacity_is_dropped(path, outside):
    key = block_key(FP, np.arange(100, 102))
    craft(path, key=key, tokens=tokens_of(2), segment=10**12)
    dropped = []
    with opens(path, on_drop=dropped.extend) as tier:
        assert not tier.contains(key) and tier.stats()["dropped_capacity"] == 1
        assert tier.stats()["corruptions"] == 0
        serves_all(tier)
    assert dropped == [key]
    assert not any(n.startswith("segment-") and n != "segment-00000.kvs" for n in os.listdir(path))
    outside.unchanged()


def test_a_row_longer_than_a_block_never_reaches_the_index(path):
    """Without the row checks, a block of 0 or block_tokens + 1 tokens stopped a store's start-up."""
    from kvplug.index import PrefixIndex
    craft(path, **CRAFTED["too_many_tokens"][0]())
    craft(path, **CRAFTED["no_tokens"][0]())
    index = PrefixIndex(FP, 4)
    with opens(path) as tier:
        for key, parent, tokens in tier.entries():
            assert index.insert(key, parent, tokens)


@pytest.mark.parametrize("suffix", ["", "-wal", "-shm", "-journal"])
def test_manifest_checks_its_files_itself(tmp_path, outside, suffix):
    """A link planted after the directory scan: the manifest checks before SQLite opens anything."""
    from kvplug.tiers.manifest import Manifest
    db = tmp_path / "manifest.sqlite3"
    Manifest(str(db), {"block_bytes": 1}).close()
    (tmp_path / f"manifest.sqlite3{suffix}").unlink(missing_ok=True)
    (tmp_path / f"manifest.sqlite3{suffix}").symlink_to(outside.file)
    with pytest.raises(UnsafeDirectory, match="symbolic link"):
        Manifest(str(db), {"block_bytes": 1})
    outside.unchanged()
