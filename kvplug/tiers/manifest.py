"""The SSD tier's manifest: one SQLite (WAL) row per stored block.

A row is the only thing that makes a slot's bytes findable, so the tier
commits it after the bytes are written and deletes it (committed) before the
slot is reused. WAL with synchronous=NORMAL makes every commit survive a
kill -9; a power cut may roll back the last few commits, which only turns
those blocks into misses (slot headers and checksums catch any mismatch).

New rows are group-committed: a committer thread commits every row queued
while the previous commit ran in one transaction, so small blocks do not pay
a commit each.

A manifest that SQLite cannot read is moved aside (``*.corrupt``); the rows
that can still be read from it are salvaged into a fresh one. Rows are plain
columns, never pickled. The file and its companions (-wal, -shm, -journal)
are checked before SQLite opens them (it follows links: kvplug/tiers/ssd_dir.py),
and a row with a blob longer than ``max_blob`` is deleted unread.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import sqlite3
import threading
from dataclasses import dataclass
from typing import Iterable, NamedTuple

import numpy as np

from kvplug.keys import KEY_BYTES
from kvplug.tiers import row_check as row_checks
from kvplug.tiers.row_check import intact as _intact, row_check  # noqa: F401  (re-exported)
from kvplug.tiers.ssd_dir import UnsafeDirectory, check_sqlite, private_sqlite

log = logging.getLogger("kvplug")

SCHEMA_VERSION = 1

_COLUMNS = "key, parent, tokens, segment, slot, checksum, fingerprint, format, last_access, row_check"
_INSERT = f"INSERT OR REPLACE INTO blocks ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)"
_BLOBS = ("key", "parent", "tokens", "fingerprint")
_TOUCH = "UPDATE blocks SET last_access = ? WHERE key = ?"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS blocks (
    key BLOB PRIMARY KEY,         -- 16-byte chained block key
    parent BLOB NOT NULL,         -- parent's key (or the fingerprint for a first block)
    tokens BLOB NOT NULL,         -- the block's token ids, little-endian int64
    segment INTEGER NOT NULL,     -- segment file number
    slot INTEGER NOT NULL,        -- slot within the segment
    checksum INTEGER NOT NULL,    -- xxh3_64 of the block bytes, as signed int64
    fingerprint BLOB NOT NULL,    -- root fingerprint the block was stored under
    format INTEGER NOT NULL,      -- kvplug.keys.FORMAT_VERSION when stored
    last_access INTEGER NOT NULL, -- logical clock, for LRU across restarts
    row_check INTEGER NOT NULL    -- xxh3_64 of every column above but last_access
) WITHOUT ROWID;
"""


class Row(NamedTuple):
    key: bytes
    parent: bytes
    tokens: bytes
    segment: int
    slot: int
    checksum: int
    fingerprint: bytes
    format: int
    last_access: int

    def with_check(self) -> tuple:
        return (*self, row_check(self))



CHUNK_ROWS = 32768  # rows fetched and checked at a time: their objects are still in the CPU's caches


@dataclass
class StartupColumns(row_checks.Columns):
    hashes: np.ndarray = None  # [n] hash(key) & 0xFFFFFFFF: the tables' home slots


def _checked_columns(chunks) -> tuple[StartupColumns, list[tuple]]:
    """The intact rows of ``chunks`` (a cursor, or an iterator of row lists) as columns
    (``row_check.columns``), with their keys' hashes; and the rows that are not intact."""
    parts, hashes, bad = [], [], []
    fetch = chunks.fetchmany if isinstance(chunks, sqlite3.Cursor) else None
    while rows := (fetch(CHUNK_ROWS) if fetch else next(chunks, None)):
        intact, part = row_checks.columns(rows)
        parts.append(part)
        hashes.append(np.fromiter(map(hash, part.blobs[0]), np.int64, len(part.ints)) & 0xFFFFFFFF)
        bad += [rows[i] for i in np.flatnonzero(~intact).tolist()]
    if not parts:
        return StartupColumns([[], [], [], []], np.zeros((0, 6), np.int64), np.zeros((0, 4), np.int64),
                              np.zeros((0, 3, KEY_BYTES), np.uint8), np.zeros(0, np.int64)), bad
    blobs = [[], [], [], []]
    for part in parts:
        for column, more in zip(blobs, part.blobs):
            column.extend(more)
    return StartupColumns(blobs, *(np.concatenate([getattr(p, name) for p in parts])
                                   for name in ("ints", "lengths", "sides")), np.concatenate(hashes)), bad


class Manifest:
    """Thread-safe. ``insert`` is group-committed; every other update is one short transaction."""

    def __init__(self, path: str, geometry: dict[str, int], max_blob: int = 1 << 20) -> None:
        self.path = path
        self.reset_reason: str | None = None
        self._lock = threading.Lock()
        self._geometry = {"schema": SCHEMA_VERSION, **geometry}
        self._max_blob = int(max_blob)
        self._conn: sqlite3.Connection | None = None
        oversized = 0
        try:
            self._conn = self._connect()
            self._check_geometry()
            columns, bad_rows = _checked_columns(self._conn.execute(self._select()))
            # A blob past max_blob reads as NULL (``_select``): such rows are deleted unread.
            if any(len(r) == 10 and None in (r[0], r[1], r[2], r[6]) for r in bad_rows):
                with self._conn:
                    oversized = self._conn.execute(
                        "DELETE FROM blocks WHERE length(key) > ?1 OR length(parent) > ?1 OR length(tokens) > ?1 "
                        "OR length(fingerprint) > ?1", (self._max_blob,)).rowcount
            if bad_rows:
                with self._conn:
                    self._conn.executemany("DELETE FROM blocks WHERE key = ?", [(r[0],) for r in bad_rows])
        except UnsafeDirectory:
            if self._conn is not None:
                self._conn.close()
            raise
        except Exception as e:  # a damaged file raises more than DatabaseError (bad UTF-8, ...)
            if self._conn is not None:
                self._conn.close()
            rows = self._salvage(f"{type(e).__name__}: {e}")  # keeps only intact rows
            columns, bad_rows = _checked_columns(iter([rows]))
        # The intact rows, as columns in the order read (``row_check.columns``), and the
        # order of their last access, oldest first (cheaper than SQLite's ORDER BY on an
        # unindexed column; the columns stay put: the rows' objects lie in memory as read).
        self.columns: StartupColumns | None = columns  # taken by the tier's start-up
        self.order: np.ndarray = np.argsort(columns.ints[:, 4], kind="stable")
        self.oversized_rows = max(oversized, 0)  # a blob past max_blob: deleted unread
        self.dropped_rows = len(bad_rows) - self.oversized_rows  # damaged, and deleted
        self.dropped_keys = [r[0] for r in bad_rows if r and isinstance(r[0], bytes)]
        self._queue: list[tuple[list, list, cf.Future]] = []
        self._queued = threading.Condition()
        self._closing = False
        self._committer = threading.Thread(target=self._commit_loop, name="kvplug-manifest", daemon=True)
        self._committer.start()

    # -- opening --------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        private_sqlite(self.path)  # no links; 0600 (SQLite gives its -wal and -shm the file's mode)
        conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA temp_store=MEMORY")  # no temporary files outside the directory
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {check}")
            with conn:
                conn.executescript(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        return conn

    def _select(self) -> str:
        """Every column, a blob longer than ``max_blob`` read as NULL (then the row is not intact)."""
        cols = [f"CASE WHEN length({c}) <= {self._max_blob} THEN {c} END" if c in _BLOBS else c
                for c in _COLUMNS.split(", ")]
        return f"SELECT {', '.join(cols)} FROM blocks"

    def _all_rows(self) -> list[tuple]:
        return self._conn.execute(self._select()).fetchall()

    def _salvage(self, why: str) -> list[tuple]:
        """Read what rows we can from a damaged file, then start a fresh one."""
        rows: list[tuple] = []
        check_sqlite(self.path)
        try:
            conn = sqlite3.connect(self.path)
            try:
                meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
                if meta != self._geometry:
                    raise sqlite3.DatabaseError("unknown slot geometry")
                for r in conn.execute(self._select()):
                    rows.append(tuple(r))
            finally:
                conn.close()
        except Exception:
            pass  # keep what was read before the damage
        for suffix in ("", "-wal", "-shm", "-journal"):
            if os.path.exists(self.path + suffix):
                os.replace(self.path + suffix, self.path + ".corrupt" + suffix)
        self.reset_reason = f"manifest {self.path} was damaged ({why}); salvaged {len(rows)} rows, moved it to .corrupt"
        log.warning("kvplug SSD tier: %s", self.reset_reason)
        self._conn = self._connect()
        with self._conn:
            self._conn.executemany("INSERT INTO meta VALUES (?, ?)", self._geometry.items())
            self._conn.executemany(_INSERT, (r for r in rows if _intact(r)))
        rows.sort(key=lambda r: r[8] if _intact(r) else 0)
        return rows

    def _check_geometry(self) -> None:
        """Slot geometry must match what the rows were written with, else start empty."""
        want = self._geometry
        have = dict(self._conn.execute("SELECT name, value FROM meta").fetchall())
        if have and have != want:
            n = self._conn.execute("SELECT COUNT(*) FROM blocks").fetchone()[0]
            log.warning("kvplug SSD tier: %s was written with %s, now %s; dropping its %d blocks",
                        self.path, have, want, n)
            self.reset_reason = "slot geometry changed"
        if have != want:
            with self._conn:
                self._conn.execute("DELETE FROM blocks")
                self._conn.execute("DELETE FROM meta")
                self._conn.executemany("INSERT INTO meta VALUES (?, ?)", want.items())

    # -- updates --------------------------------------------------------------

    def insert(self, rows: Iterable[Row], touches: Iterable[tuple[int, bytes]] = ()) -> cf.Future:
        """Queue rows (and LRU touches to persist on the way); the future is
        done once they are committed, or holds the error that stopped them."""
        fut: cf.Future = cf.Future()
        with self._queued:
            if self._closing:
                raise RuntimeError(f"manifest {self.path} is closed")
            self._queue.append(([r.with_check() for r in rows], list(touches), fut))
            self._queued.notify()
        return fut

    def _commit_loop(self) -> None:
        while True:
            with self._queued:
                self._queued.wait_for(lambda: self._queue or self._closing)
                batch, self._queue = self._queue, []
            if not batch:
                return  # closing, and everything queued is committed
            try:
                with self._lock, self._conn:
                    self._conn.executemany(_INSERT, [row for rows, _, _ in batch for row in rows])
                    self._conn.executemany(_TOUCH, [t for _, touches, _ in batch for t in touches])
            except Exception as e:  # sqlite3.Error, mostly: the whole batch failed
                for _, _, fut in batch:
                    fut.set_exception(e)
            else:
                for _, _, fut in batch:
                    fut.set_result(None)

    def delete(self, keys: Iterable[bytes]) -> None:
        with self._lock, self._conn:
            self._conn.executemany("DELETE FROM blocks WHERE key = ?", ((k,) for k in keys))

    def touch(self, touches: Iterable[tuple[int, bytes]]) -> None:
        with self._lock, self._conn:
            self._conn.executemany(_TOUCH, touches)

    def entries(self, fingerprint: bytes, fmt: int) -> list[tuple[bytes, bytes, bytes]]:
        with self._lock:
            return self._conn.execute(
                "SELECT key, parent, tokens FROM blocks WHERE fingerprint = ? AND format = ?",
                (fingerprint, fmt)).fetchall()

    def close(self) -> None:
        with self._queued:
            self._closing = True
            self._queued.notify()
        self._committer.join()
        with self._lock:
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as e:
                log.warning("kvplug SSD tier: checkpoint of %s failed: %s", self.path, e)
            self._conn.close()
