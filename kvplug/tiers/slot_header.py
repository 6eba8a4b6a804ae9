"""The self-describing header of an SSD slot, right after the block's bytes.

It lets a slot be checked against the manifest row that points at it: a slot
reused, torn by a crash, overwritten by another model or an older format, or
simply rotted, fails one of these checks and is read as a miss.
"""

from __future__ import annotations

import struct

import xxhash

from kvplug.keys import FORMAT_VERSION
from kvplug.tiers.slots import HEADER_BYTES

MAGIC = b"KVPLUGB\x00"
# magic, format version, reserved, fingerprint, key, block length, xxh3_64 (signed)
HEADER = struct.Struct("<8sII16s16sQq")
assert HEADER.size <= HEADER_BYTES


def checksum(buf) -> int:
    """xxh3_64 as a signed int64, which is what SQLite integers hold."""
    c = xxhash.xxh3_64_intdigest(buf)
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
