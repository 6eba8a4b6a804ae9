"""The file layer under the SSD tier: positional vectored I/O, O_DIRECT or not.

Everything goes through one small object so tests can inject faults (ENOSPC,
EIO) exactly where the kernel would raise them. O_DIRECT needs the buffer
address, file offset and length aligned; slots are 4096-aligned throughout,
which covers both 512-byte and 4K logical sectors.
"""

from __future__ import annotations

import errno
import mmap
import os
import tempfile
import threading

from kvplug.tiers.slots import ALIGN
from kvplug.tiers.ssd_dir import DirectoryBusy, lock_directory, open_file  # noqa: F401  (re-exported)


def aligned_buffer(nbytes: int) -> memoryview:
    """A zeroed, page-aligned (so O_DIRECT-safe) writable buffer."""
    return memoryview(mmap.mmap(-1, nbytes))


def probe_direct(directory: str) -> str | None:
    """None if O_DIRECT works in ``directory``, else why it does not."""
    if not hasattr(os, "O_DIRECT"):
        return "this platform has no O_DIRECT"
    fd, path = tempfile.mkstemp(prefix=".kvplug-odirect-", dir=directory)
    os.close(fd)
    try:
        fd = open_file(path, os.O_RDWR | os.O_DIRECT)
        try:
            buf = aligned_buffer(ALIGN)
            buf[:8] = b"kvplug\0\0"
            # tmpfs and some FUSE/network filesystems accept the flag at open
            # and only fail on the first I/O, so do one of each.
            if os.pwritev(fd, [buf], 0) != ALIGN or os.preadv(fd, [buf], 0) != ALIGN:
                return "short O_DIRECT transfer"
        finally:
            os.close(fd)
        return None
    except OSError as e:
        return f"{errno.errorcode.get(e.errno, e.errno)}: {e.strerror}"
    finally:
        os.unlink(path)


class FileIO:
    """Plain positional vectored I/O. Short transfers are reported, not retried.
    Files are never opened through a link (kvplug/tiers/ssd_dir.py)."""

    def open(self, path: str, direct: bool) -> int:
        return open_file(path, os.O_RDWR | os.O_CREAT | (os.O_DIRECT if direct else 0))

    def close(self, fd: int) -> None:
        os.close(fd)

    def preadv(self, fd: int, bufs: list[memoryview], offset: int) -> int:
        return os.preadv(fd, bufs, offset)

    def pwritev(self, fd: int, bufs: list[memoryview], offset: int) -> int:
        return os.pwritev(fd, bufs, offset)

    def sync(self, fd: int) -> None:
        os.fdatasync(fd)


class FaultyIO(FileIO):
    """FileIO that raises injected errors, for fault tests.

    ``fail("write", errno.ENOSPC, times=3)`` makes the next 3 pwritev calls
    raise ENOSPC; ``times=None`` keeps failing until ``heal()``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: dict[str, tuple[int, int | None]] = {}

    def fail(self, op: str, err: int, times: int | None = None) -> None:
        with self._lock:
            self._faults[op] = (err, times)

    def heal(self) -> None:
        with self._lock:
            self._faults.clear()

    def _maybe_raise(self, op: str) -> None:
        with self._lock:
            if op not in self._faults:
                return
            err, times = self._faults[op]
            if times is not None:
                if times <= 1:
                    del self._faults[op]
                else:
                    self._faults[op] = (err, times - 1)
        raise OSError(err, os.strerror(err))

    def preadv(self, fd: int, bufs: list[memoryview], offset: int) -> int:
        self._maybe_raise("read")
        return super().preadv(fd, bufs, offset)

    def pwritev(self, fd: int, bufs: list[memoryview], offset: int) -> int:
        self._maybe_raise("write")
        return super().pwritev(fd, bufs, offset)
