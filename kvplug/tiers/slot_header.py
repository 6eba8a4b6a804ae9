"""The self-describing header of an SSD slot, right after the block's bytes.

It lets a slot be checked against the manifest row that points at it: a slot
reused, torn by a crash, overwritten by another model or an older format, or
simply rotted, fails one of these checks and is read as a miss.
"""

from __future__ import annotations

import ctypes
import struct

import numpy as np
import xxhash

from kvplug.keys import FORMAT_VERSION
from kvplug.tiers.slots import HEADER_BYTES

MAGIC = b"KVPLUGB\x00"
# magic, format version, reserved, fingerprint, key, block length, xxh3_64 (signed)
HEADER = struct.Struct("<8sII16s16sQq")
assert HEADER.size <= HEADER_BYTES


def _unlocked_xxh3():
    """xxhash's own C XXH3_64bits through ctypes, which lets go of the GIL while
    it hashes; the Python binding holds it, so I/O threads hashing megabyte
    blocks would take turns. None (use the binding) if it cannot be found."""
    try:
        lib = ctypes.CDLL(xxhash._xxhash.__file__)
        fn = getattr(lib, "XXH3_64bits_dispatch", None) or lib.XXH3_64bits  # dispatch: AVX2/512 when there
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_uint64, [ctypes.c_void_p, ctypes.c_size_t]
    probe = np.arange(4096, dtype=np.uint64).view(np.uint8)
    return fn if fn(probe.ctypes.data, probe.size) == xxhash.xxh3_64_intdigest(probe) else None


_XXH3_UNLOCKED = _unlocked_xxh3()


def checksum(buf) -> int:
    """xxh3_64 of a byte buffer, as a signed int64, which is what SQLite integers hold."""
    arr = np.frombuffer(buf, np.uint8)
    if _XXH3_UNLOCKED is not None and arr.size >= 1 << 16:
        c = _XXH3_UNLOCKED(arr.ctypes.data, arr.size)
    else:
        c = xxhash.xxh3_64_intdigest(arr)
    return c - (1 << 64) if c >= 1 << 63 else c


def pack(slot, block_bytes: int, fingerprint: bytes, key: bytes) -> int:
    """Checksum the block at slot[:block_bytes], write the header after it; returns the checksum."""
    csum = checksum(slot[:block_bytes])
    HEADER.pack_into(slot, block_bytes, MAGIC, FORMAT_VERSION, 0, fingerprint, key, block_bytes, csum)
    return csum


def verify(slot, block_bytes: int, fingerprint: bytes, key: bytes, csum: int) -> str | None:
    """None if the slot holds exactly the block the manifest expects, else what is wrong."""
    magic, fmt, reserved, fp, hkey, length, hcsum = HEADER.unpack_from(slot, block_bytes)
    if magic != MAGIC or reserved != 0:
        return "header"
    if fmt != FORMAT_VERSION or fp != fingerprint:
        return "foreign"
    if hkey != key or length != block_bytes or hcsum != csum:
        return "header"
    if checksum(slot[:block_bytes]) != csum:
        return "checksum"
    return None
