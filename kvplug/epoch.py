"""The store's cache epoch.

Every request's key root holds the epoch, so moving to a new one (vLLM's
``reset_prefix_cache``, e.g. after weights were updated in place) makes every
block stored before it unreachable. With an SSD tier the epoch is kept in its
directory (written atomically), so a restart does not bring old blocks back.
The first epoch is empty: a store that was never reset keeps its keys.
"""

from __future__ import annotations

import os
import secrets

FILE = "EPOCH"
_BYTES = 16


def load(directory: str | None) -> bytes:
    """The epoch recorded in ``directory`` (b"" when none was, or unreadable: a fresh store)."""
    if directory is None:
        return b""
    try:
        fd = os.open(os.path.join(directory, FILE), os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return b""
    with os.fdopen(fd, "rb") as f:
        text = f.read(2 * _BYTES + 1).strip()
    try:
        value = bytes.fromhex(text.decode())
    except ValueError:
        value = b""
    if len(value) != _BYTES:
        # An epoch file that cannot be read back must not bring back the blocks of
        # the first epoch: any value nobody stored under will do.
        return secrets.token_bytes(_BYTES)
    return value


def advance(directory: str | None) -> bytes:
    """A new random epoch, recorded in ``directory`` (tmp file, fsync, rename) before it is used."""
    value = secrets.token_bytes(_BYTES)
    if directory is not None:
        path, tmp = os.path.join(directory, FILE), os.path.join(directory, f".{FILE}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, value.hex().encode() + b"\n")
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
