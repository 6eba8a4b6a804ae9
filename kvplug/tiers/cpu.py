"""CPUTier: one slab of fixed-size slots, allocated once.

The slab is a uint8 tensor ``[num_slots, slot_stride]``. Slots are handed out
and taken back through a free list: O(1) each way, and no fragmentation by
construction since every slot has the same size.

Memory comes from mmap, so it is page-aligned (an O_DIRECT SSD read can
target a slot) and, in shared mode, backed by a file in a tmpfs directory
(``/dev/shm``) that another process maps by name with ``CPUTier.attach``: the
vLLM worker copies KV into the very slots the scheduler-side store handed out.
The space is reserved up front (fallocate), so a too-small /dev/shm fails at
start-up with a clear message instead of a SIGBUS mid-run.

With ``pin`` and CUDA present, this process's mapping is page-locked
(cudaHostRegister) so host<->device copies are fast and asynchronous. Pinning
is per process: pin where the copies happen (the worker that attaches), not
in a scheduler process that would only pay a CUDA context for it. Only memory
on tmpfs (or anonymous) can be pinned; elsewhere the slab works unpinned.

A shared slab has an identity nobody else can take: the creator makes the
file exclusively (a name that exists already is an error, never replaced) and
writes a header page (magic, a random instance nonce, geometry) before the
slots; ``attach`` maps it only if the header holds the nonce the creator
handed out, so a worker can never map another engine's slab.

Only the creating process allocates slots; an attached tier reads and writes
slots the owner named. Not thread-safe: the store serialises allocate/free.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import secrets
import struct

import numpy as np
import torch

from kvplug.tiers.slots import slot_stride

log = logging.getLogger("kvplug")

HEADER_BYTES = 4096  # one page: the slots after it stay page-aligned (O_DIRECT)
# magic, version, nonce, num_slots, slot_stride, block_bytes, and the creator: its pid namespace,
# pid and start time (clock ticks since boot)
_HEADER = struct.Struct("<8sH16sQQQQQQ")
_MAGIC, _VERSION = b"KVPLUGSL", 2


class CPUTier:
    def __init__(self, memory: mmap.mmap, block_bytes: int, *, path: str | None, owner: bool, pin: bool,
                 nonce: bytes = b""):
        self.block_bytes = block_bytes
        self.slot_stride = slot_stride(block_bytes)
        offset = HEADER_BYTES if path is not None else 0
        self.num_slots = (len(memory) - offset) // self.slot_stride
        self.path = path  # the shared-memory file, None for private memory
        self.nonce = nonce  # a shared slab's instance identity (its header holds it)
        self.owner = owner
        self._memory = memory
        self.buffer = torch.frombuffer(memory, dtype=torch.uint8, offset=offset).view(self.num_slots, self.slot_stride)
        self.pinned = pin and _pin(self.buffer)
        self._free = list(range(self.num_slots - 1, -1, -1)) if owner else []  # pop() gives slot 0 first
        self._used = bytearray(self.num_slots)  # catches a double free

    # -- opening --------------------------------------------------------------

    @classmethod
    def create(cls, capacity_bytes: int, block_bytes: int, name: str | None = None,
               shm_dir: str = "/dev/shm", pin: bool = True) -> "CPUTier":
        """A new slab of ``capacity_bytes // slot_stride`` slots; shared under ``name`` if one
        is given (created exclusively: a file of that name is never replaced)."""
        stride = slot_stride(block_bytes)
        num_slots = capacity_bytes // stride
        if block_bytes <= 0 or num_slots < 1:
            raise ValueError(f"kvplug CPU tier: cpu_bytes={capacity_bytes} holds no slot of {stride} bytes "
                             f"(block_bytes={block_bytes}); expected at least {stride}")
        size = num_slots * stride
        if name is None:
            return cls(mmap.mmap(-1, size), block_bytes, path=None, owner=True, pin=pin)
        path = cls.shm_path(name, shm_dir)
        size += HEADER_BYTES
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            raise FileExistsError(f"kvplug CPU tier: {path} exists already; a slab is never replaced "
                                  "(another engine may be using it)") from None
        try:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EFBIG):
                    raise
                os.unlink(path)
                raise OSError(e.errno, f"kvplug CPU tier: no room for a {size}-byte slab in shm_dir={shm_dir!r} "
                              f"({e.strerror}); lower cpu_bytes, point shm_dir at a larger tmpfs, or set "
                              "shared_memory=false") from None
            memory = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        nonce = secrets.token_bytes(16)
        pid = os.getpid()
        memory[:_HEADER.size] = _HEADER.pack(_MAGIC, _VERSION, nonce, num_slots, stride, block_bytes,
                                             _pid_namespace(), pid, _start_time(pid) or 0)
        return cls(memory, block_bytes, path=path, owner=True, pin=pin, nonce=nonce)

    @classmethod
    def attach(cls, name: str, block_bytes: int, shm_dir: str = "/dev/shm", pin: bool = True,
               nonce: bytes | None = None) -> "CPUTier":
        """Map the slab another process created under ``name``, if its header holds ``nonce``
        (the creator's ``nonce``) and the geometry of ``block_bytes``."""
        path = cls.shm_path(name, shm_dir)
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        try:
            size = os.fstat(fd).st_size
            stride = slot_stride(block_bytes)
            header = os.pread(fd, _HEADER.size, 0)
            if len(header) < _HEADER.size:
                raise ValueError(f"kvplug CPU tier: {path} is not a kvplug slab (no header)")
            magic, version, found, num_slots, found_stride, found_bytes, *_ = _HEADER.unpack(header)
            if magic != _MAGIC or version != _VERSION:
                raise ValueError(f"kvplug CPU tier: {path} is not a kvplug slab of format {_VERSION}")
            if nonce is not None and found != nonce:
                raise ValueError(f"kvplug CPU tier: {path} belongs to another engine instance (nonce differs)")
            if (found_stride, found_bytes) != (stride, block_bytes) or size != HEADER_BYTES + num_slots * stride:
                raise ValueError(f"kvplug CPU tier: {path} holds blocks of {found_bytes} bytes in {num_slots} "
                                 f"slots of {found_stride} ({size} bytes), expected blocks of {block_bytes}: "
                                 "another layout or codec made it")
            memory = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(memory, block_bytes, path=path, owner=False, pin=pin, nonce=found)

    @staticmethod
    def sweep_dead(shm_dir: str = "/dev/shm", prefix: str = "kvplug-") -> list[str]:
        """Remove the slabs of kvplug engines that died before removing theirs (kill -9 before
        every worker attached): this user's files named ``prefix*`` whose header says kvplug
        and whose creator process (pid and start time, in this pid namespace) is gone. The
        names removed."""
        removed = []
        try:
            names = [n for n in os.listdir(shm_dir) if n.startswith(prefix)]
        except OSError:
            return removed
        for name in names:
            path = os.path.join(shm_dir, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                if os.fstat(fd).st_uid != os.getuid():
                    continue
                header = os.pread(fd, _HEADER.size, 0)
            finally:
                os.close(fd)
            if len(header) < _HEADER.size:
                continue
            magic, version, *_, namespace, pid, started = _HEADER.unpack(header)
            # Only a creator in this pid namespace can be known dead (another container's is invisible).
            if magic == _MAGIC and version == _VERSION and namespace == _pid_namespace() \
                    and _start_time(pid) != started:
                try:
                    os.unlink(path)
                    removed.append(name)
                except OSError:
                    pass
        if removed:
            log.warning("kvplug CPU tier: removed %d shared-memory slab(s) of dead engines from %s: %s",
                        len(removed), shm_dir, ", ".join(removed))
        return removed

    @staticmethod
    def unique_name(prefix: str) -> str:
        """A slab name for one engine instance: the prefix and 64 random bits."""
        return f"{prefix}-{secrets.token_hex(8)}"

    @staticmethod
    def shm_path(name: str, shm_dir: str = "/dev/shm") -> str:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"kvplug CPU tier: shared-memory name {name!r} must be a plain file name")
        return os.path.join(shm_dir, name)

    @property
    def name(self) -> str | None:
        return None if self.path is None else os.path.basename(self.path)

    # -- slots ----------------------------------------------------------------

    def allocate(self) -> int | None:
        """A free slot, or None when all are in use."""
        if not self._free:
            return None
        slot = self._free.pop()
        self._used[slot] = 1
        return slot

    def free(self, slot: int) -> None:
        if not self.owner:
            raise RuntimeError("kvplug CPU tier: an attached slab does not allocate; the owner frees slots")
        if not self._used[slot]:
            raise ValueError(f"kvplug CPU tier: slot {slot} is not allocated")
        self._used[slot] = 0
        self._free.append(slot)

    def slot_view(self, slot: int) -> torch.Tensor:
        """The whole slot (``slot_stride`` bytes, 4096-aligned): what an SSD transfer moves."""
        return self.buffer[slot]

    def block_view(self, slot: int) -> torch.Tensor:
        """The block's bytes in a slot (``block_bytes``)."""
        return self.buffer[slot, : self.block_bytes]

    def write_block(self, slot: int, data) -> None:
        """Copy a block's bytes (a contiguous tensor, array or bytes-like of any dtype) into a slot."""
        if isinstance(data, torch.Tensor):
            data = data.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
        src, dst = np.frombuffer(data, dtype=np.uint8), self.block_view(slot)
        if src.size != dst.numel():
            raise ValueError(f"a block is {dst.numel()} bytes, got {src.size}")
        np.copyto(dst.numpy(), src)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def stats(self) -> dict[str, int | float]:
        used = self.num_slots - len(self._free) if self.owner else 0
        return {
            "capacity_blocks": self.num_slots,
            "capacity_bytes": self.num_slots * self.slot_stride,
            "used_slots": used,
            "free_slots": len(self._free),
            "shared": int(self.path is not None),
            "pinned": int(self.pinned),
        }

    # -- closing --------------------------------------------------------------

    def close(self) -> None:
        """Release this process's mapping (the file stays: see ``unlink``)."""
        if self._memory is None:
            return
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())
            self.pinned = False
        # No mmap.close(): tensors do not hold a buffer export, so closing would
        # unmap memory that slot views elsewhere still point at. Every view
        # keeps the mmap alive; the last one to go unmaps it.
        self.buffer = None
        self._memory = None

    def unlink(self) -> None:
        """Remove the shared-memory file this process created; mappings stay valid until closed.
        Never a slab it only attached, nor a file another took the name with since."""
        if self.path is None or not self.owner:
            return
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return
        try:
            header = os.pread(fd, _HEADER.size, 0)
        finally:
            os.close(fd)
        if len(header) == _HEADER.size and _HEADER.unpack(header)[2] == self.nonce:
            os.unlink(self.path)

    def __enter__(self) -> "CPUTier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        if self.owner:
            self.unlink()


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _start_time(pid: int) -> int | None:
    """When a process started (clock ticks since boot), None if there is no such process:
    with the pid it names a process even after its pid is reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[19])  # field 22, counted after the name


def _pin(buffer: torch.Tensor) -> bool:
    """Page-lock the slab for fast async host<->device copies; False without CUDA or if refused."""
    if not torch.cuda.is_available():
        return False
    err = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
    if int(err) == 0:
        return True
    # The refusal (e.g. a file mapping outside tmpfs) stays as CUDA's sticky
    # "last error" and would fail the next unrelated CUDA call: clear it.
    _clear_cuda_error()
    log.warning("kvplug CPU tier: slab not page-locked (cudaHostRegister returned %s); transfers fall back to "
                "the 'host' transport (memmove through pinned staging, several times slower)", err)
    return False


def _clear_cuda_error() -> None:
    for soname in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            ctypes.CDLL(soname).cudaGetLastError()  # the copy torch loaded: same soname
            return
        except (OSError, AttributeError):
            continue
