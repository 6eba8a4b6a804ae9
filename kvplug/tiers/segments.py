"""Segment files: the SSD tier's fixed-size slots, and batched vectored I/O on them.

Slot g lives in ``segment-NNNNN.kvs`` number g // slots_per_segment, at byte
(g % slots_per_segment) * stride. A batch of transfers is sorted by slot and
cut into runs of consecutive slots of one segment; each run is one
preadv/pwritev straight from or into the callers' slot buffers: several
blocks per syscall, no copy.
"""

from __future__ import annotations

import errno
import os
import threading

from kvplug.tiers.aligned_io import FileIO

MAX_RUN_BYTES = 16 << 20   # one syscall's worth; bigger runs gain nothing


class Segments:
    def __init__(self, directory: str, stride: int, slots_per_segment: int, direct: bool, io: FileIO,
                 max_in_flight: int) -> None:
        self.directory = directory
        self.stride = stride
        self.slots_per_segment = slots_per_segment
        self.direct = direct
        self._io = io
        self._fds: dict[int, int] = {}
        # More threads than this may be busy (checksums), but only this many syscalls at once.
        self._in_flight = threading.BoundedSemaphore(max_in_flight)

    def _fd(self, segment: int) -> int:
        fd = self._fds.get(segment)
        if fd is None:  # a race opens it twice at worst; the loser's fd is closed
            fd = self._io.open(os.path.join(self.directory, f"segment-{segment:05d}.kvs"), self.direct)
            if self._fds.setdefault(segment, fd) != fd:
                self._io.close(fd)
                fd = self._fds[segment]
        return fd

    def transfer(self, write: bool, items: list[tuple[int, memoryview]]) -> list[int | OSError]:
        """Read or write each (slot, slot-sized buffer); per item, the bytes
        moved (short means truncated) or the error that stopped its run."""
        out: list[int | OSError] = [0] * len(items)
        order = sorted(range(len(items)), key=lambda i: items[i][0])
        start = 0
        while start < len(order):
            end = start + 1
            first = items[order[start]][0]
            while (end < len(order) and items[order[end]][0] == first + (end - start)
                   and (first + end - start) % self.slots_per_segment
                   and (end - start + 1) * self.stride <= MAX_RUN_BYTES):
                end += 1
            run = order[start:end]
            segment, s = divmod(first, self.slots_per_segment)
            bufs = [items[i][1] for i in run]
            try:
                fd = self._fd(segment)
                with self._in_flight:
                    if write:
                        n = self._io.pwritev(fd, bufs, s * self.stride)
                    else:
                        n = self._io.preadv(fd, bufs, s * self.stride)
                for k, i in enumerate(run):
                    out[i] = min(max(n - k * self.stride, 0), self.stride)
                    if write and out[i] < self.stride:  # a short write is a full disk, in practice
                        out[i] = OSError(errno.ENOSPC, f"short write ({n} of {len(run) * self.stride} bytes)")
            except OSError as e:
                for i in run:
                    out[i] = e
            start = end
        return out

    def prune(self, num_slots: int) -> None:
        """Delete the segment files wholly past ``num_slots`` (the capacity shrank)."""
        keep = -(-num_slots // self.slots_per_segment)
        for name in os.listdir(self.directory):
            num = name[len("segment-"):-len(".kvs")]
            if name.startswith("segment-") and name.endswith(".kvs") and num.isdigit() and int(num) >= keep:
                os.unlink(os.path.join(self.directory, name))

    def close(self) -> list[OSError]:
        """fdatasync and close every file; the errors met on the way."""
        errors = []
        for fd in self._fds.values():
            try:
                self._io.sync(fd)
            except OSError as e:
                errors.append(e)
            self._io.close(fd)
        self._fds.clear()
        return errors
