"""Check every block of an SSD tier directory, offline (``kvplug verify``).

The same checks the tier makes when it reads a block, with the tier's own
code: the manifest row's integrity (``manifest._intact``), its key against
the hash of its parent and tokens, and the slot's header, checksum and (with
the integrity key) MAC against the row (``slot_header.verify``). Blocks of
every fingerprint are checked, not only one model's. Nothing is changed
unless ``drop_bad``: then the bad rows are deleted through the manifest, so
that the slots they named are free for the next engine.

The directory's lock is held throughout: a running engine's directory is
refused (``DirectoryBusy``), never read half-written. A directory without a
manifest, or whose manifest SQLite cannot read as kvplug's, is refused
(``NotAStore``) before the lock is taken: nothing is written into it.
"""

from __future__ import annotations

import os
import sqlite3
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from kvplug.keys import block_key
from kvplug.tiers import slot_header, ssd_dir
from kvplug.tiers.manifest import _COLUMNS, Manifest, Row, _intact


class NotAStore(ValueError):
    """The directory holds no kvplug SSD tier, or its manifest cannot be read as one."""


@dataclass
class VerifyReport:
    path: str
    blocks: int = 0
    sound: int = 0
    bad: list[tuple[object, str]] = field(default_factory=list)  # (key as stored, problem)
    mac_unchecked: int = 0   # carry a MAC, checked without the key: checksum only
    dropped: int = 0
    block_bytes: int = 0

    @property
    def problems(self) -> Counter:
        return Counter(problem for _, problem in self.bad)

    def to_dict(self) -> dict:
        return {"path": self.path, "blocks": self.blocks, "sound": self.sound, "bad": len(self.bad),
                "problems": dict(self.problems), "mac_unchecked": self.mac_unchecked, "dropped": self.dropped,
                "block_bytes": self.block_bytes, "bad_keys": [k.hex() if isinstance(k, bytes) else repr(k) for k, _ in self.bad[:100]]}


def verify(path: str, *, drop_bad: bool = False, integrity_key: bytes | None = None) -> VerifyReport:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory")
    ssd_dir.check_directory(path)
    ssd_dir.check_files(path)
    if not os.path.exists(os.path.join(path, ssd_dir.MANIFEST)):
        raise NotAStore(f"{path}: no kvplug SSD tier here (no {ssd_dir.MANIFEST}); nothing checked")
    lock = ssd_dir.lock_directory(path)
    try:
        return _verify(path, drop_bad, None if integrity_key is None else slot_header.derive_key(integrity_key))
    finally:
        os.close(lock)


def read_manifest(db: str) -> tuple[dict, list[tuple]]:
    ssd_dir.check_sqlite(db)
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            geometry = dict(conn.execute("SELECT name, value FROM meta").fetchall())
            rows = conn.execute(f"SELECT {_COLUMNS} FROM blocks").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise NotAStore(f"{db}: not a readable kvplug manifest ({type(e).__name__}: {e})") from e
    return geometry, rows


def _verify(path: str, drop_bad: bool, mac_key: bytes | None) -> VerifyReport:
    report = VerifyReport(path)
    db = os.path.join(path, ssd_dir.MANIFEST)
    geometry, rows = read_manifest(db)
    block_bytes, stride, per_segment = (geometry.get(k, 0) for k in ("block_bytes", "slot_stride",
                                                                      "slots_per_segment"))
    report.block_bytes = block_bytes
    fds: dict[int, int] = {}
    try:
        for r in rows:
            report.blocks += 1
            problem = _check(path, r, block_bytes, stride, per_segment, mac_key, fds, report)
            if problem is None:
                report.sound += 1
            else:
                report.bad.append((r[0], problem))
    finally:
        for fd in fds.values():
            os.close(fd)
    if drop_bad and report.bad:
        manifest = Manifest(db, geometry, max_blob=1 << 30)
        try:
            manifest.delete([k for k, _ in report.bad])
        finally:
            manifest.close()
        report.dropped = len(report.bad)
    return report


def _check(path, r, block_bytes, stride, per_segment, mac_key, fds, report) -> str | None:
    if not _intact(r):
        return "manifest_row"
    row = Row(*r[:9])
    if block_key(row.parent, np.frombuffer(row.tokens, "<i8")) != row.key:
        return "chain"
    if not (block_bytes > 0 and stride >= block_bytes and 0 <= row.slot < per_segment and row.segment >= 0):
        return "slot"
    fd = fds.get(row.segment)
    if fd is None:
        try:
            fd = fds[row.segment] = ssd_dir.open_file(os.path.join(path, f"segment-{row.segment:05d}.kvs"),
                                                      os.O_RDONLY)
        except FileNotFoundError:
            return "truncated"
    slot = os.pread(fd, stride, row.slot * stride)
    if len(slot) < stride:
        return "truncated"
    meta = None if mac_key is None else slot_header.meta_digest(row.key, row.parent, row.tokens)
    fingerprint = row.fingerprint
    problem = slot_header.verify(slot, block_bytes, fingerprint, row.key, row.checksum, mac_key, meta)
    if problem == "mac_unexpected":  # checked without the key: the checksum still says whether the bytes are whole
        report.mac_unchecked += 1
        return None if slot_header.checksum(slot[:block_bytes]) == row.checksum else "checksum"
    return problem
