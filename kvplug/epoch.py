"""The store's cache epoch.

Every request's key root holds the epoch, so moving to a new one (vLLM's
``reset_prefix_cache``, e.g. after weights were updated in place) makes every
block stored before it unreachable. With an SSD tier the epoch is kept in its
directory (written atomically), so a restart does not bring old blocks back.
The first epoch is empty: a store that was never reset keeps its keys.

With an integrity key the file also carries a keyed MAC of the epoch: one
that fails (edited, or written without the key) reads as a random epoch
nobody stored under, so nothing stored before is reachable. What the MAC
cannot stop is a replay of an older file of the same directory, or its
deletion (read as the first epoch); that reaches only blocks a reset did not
delete (a reset deletes every block it can: only saves in flight during it
survive, under the old root). An unsigned file read with a key (a store that
turns ``integrity_key`` on) fails too: a new epoch once, then signed files.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets

FILE = "EPOCH"
_BYTES = 16
_MAC_BYTES = 32
log = logging.getLogger("kvplug")


def _mac(key: bytes, value: bytes) -> bytes:
    return hashlib.blake2b(value, key=key, digest_size=_MAC_BYTES, person=b"kvplug.epoch").digest()


def load(directory: str | None, mac_key: bytes | None = None) -> bytes | None:
    """The epoch recorded in ``directory`` (b"" when none was: a fresh store, or a deleted
    file). None when the file cannot be read back or its MAC fails under ``mac_key``: the
    caller moves to a new epoch (``advance``), so nothing stored before is reachable."""
    if directory is None:
        return b""
    try:
        fd = os.open(os.path.join(directory, FILE), os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return b""
    with os.fdopen(fd, "rb") as f:
        lines = f.read(4 * _MAC_BYTES).split()
    try:
        value = bytes.fromhex(lines[0].decode())
        tag = bytes.fromhex(lines[1].decode()) if len(lines) > 1 else b""
    except (ValueError, IndexError):
        value = tag = b""
    ok = len(value) == _BYTES and (mac_key is None or hmac.compare_digest(tag, _mac(mac_key, value)))
    if not ok:
        # An epoch file that cannot be read back or trusted must not bring back the blocks
        # of an earlier epoch: a new one nobody stored under.
        log.warning("kvplug: the cache epoch in %s is unreadable or fails its MAC; starting a new one "
                    "(every block stored before is unreachable)", directory)
        return None
    return value


def advance(directory: str | None, mac_key: bytes | None = None) -> bytes:
    """A new random epoch, recorded in ``directory`` (tmp file, fsync, rename) before it is
    used; with ``mac_key``, its MAC on the next line."""
    value = secrets.token_bytes(_BYTES)
    if directory is not None:
        path, tmp = os.path.join(directory, FILE), os.path.join(directory, f".{FILE}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            text = value.hex() + ("" if mac_key is None else "\n" + _mac(mac_key, value).hex())
            os.write(fd, text.encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return value
