"""The self-describing header of an SSD slot, right after the block's bytes.

It lets a slot be checked against the manifest row that points at it: a slot
reused, torn by a crash, overwritten by another model or an older format, or
simply rotted, fails one of these checks and is read as a miss.

With an integrity key the header also holds a keyed MAC (BLAKE2b-256, keyed
with a subkey derived from the secret) over the fingerprint, format, the
block's length, a digest of its key, parent and tokens, and its bytes; flag
bit 0 says it is there. The checksum catches damage; only the MAC catches a
writer of the directory who means it (they can recompute any checksum).
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import struct

import numpy as np
import xxhash

from kvplug.keys import FORMAT_VERSION
from kvplug.tiers.slots import HEADER_BYTES

MAGIC = b"KVPLUGB\x00"
# magic, format version, flags, fingerprint, key, block length, xxh3_64 (signed), MAC
HEADER = struct.Struct("<8sII16s16sQq32s")
assert HEADER.size <= HEADER_BYTES
MAC_BYTES = 32
CHECKED_BYTES = HEADER.size - MAC_BYTES  # what a keyless read checks; the MAC only matters with its flag
FLAG_MAC = 1  # the header holds a MAC (written with an integrity key)


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


# -- keyed integrity ---------------------------------------------------------

def derive_key(secret: bytes) -> bytes:
    """The MAC key: a subkey of the configured secret (any length), never the secret itself."""
    if not secret:
        raise ValueError("an integrity key must not be empty")
    return hashlib.blake2b(secret, digest_size=32, person=b"kvplug.ssd.key").digest()


def meta_digest(key: bytes, parent: bytes, tokens: bytes) -> bytes:
    """What a block is (its key, parent and token ids), bound into its MAC."""
    h = hashlib.blake2b(digest_size=32, person=b"kvplug.ssd.meta")
    for blob in (key, parent, tokens):
        h.update(struct.pack("<Q", len(blob)))
        h.update(blob)
    return h.digest()


def mac(mac_key: bytes, meta: bytes, fingerprint: bytes, block) -> bytes:
    h = hashlib.blake2b(key=mac_key, digest_size=MAC_BYTES, person=b"kvplug.ssd.mac")
    h.update(struct.pack("<IQ", FORMAT_VERSION, memoryview(block).nbytes))
    h.update(fingerprint)
    h.update(meta)
    h.update(block)  # hashlib lets go of the GIL for big buffers
    return h.digest()


# -- the header -----------------------------------------------------------------

def pack(slot, block_bytes: int, fingerprint: bytes, key: bytes,
         mac_key: bytes | None = None, meta: bytes | None = None) -> int:
    """Checksum the block at slot[:block_bytes], write the header after it; returns the checksum.
    With ``mac_key`` (and the block's ``meta_digest``) the header carries its MAC too."""
    block = slot[:block_bytes]
    csum = checksum(block)
    tag, flags = (mac(mac_key, meta, fingerprint, block), FLAG_MAC) if mac_key is not None else (b"", 0)
    HEADER.pack_into(slot, block_bytes, MAGIC, FORMAT_VERSION, flags, fingerprint, key, block_bytes, csum, tag)
    return csum


def verify(slot, block_bytes: int, fingerprint: bytes, key: bytes, csum: int,
           mac_key: bytes | None = None, meta: bytes | None = None) -> str | None:
    """None if the slot holds exactly the block the manifest expects, else what is wrong.
    With ``mac_key`` a block must carry a MAC that verifies; without, it must carry none
    (a reader without the key cannot check it: it is not served)."""
    magic, fmt, flags, fp, hkey, length, hcsum, tag = HEADER.unpack_from(slot, block_bytes)
    if magic != MAGIC or flags & ~FLAG_MAC:
        return "header"
    if fmt != FORMAT_VERSION or fp != fingerprint:
        return "foreign"
    if hkey != key or length != block_bytes or hcsum != csum:
        return "header"
    if mac_key is None and flags & FLAG_MAC:
        return "mac_unexpected"
    if checksum(slot[:block_bytes]) != csum:
        return "checksum"
    if mac_key is not None:
        if not flags & FLAG_MAC:
            return "mac_missing"
        if meta is None or not hmac.compare_digest(tag, mac(mac_key, meta, fingerprint, slot[:block_bytes])):
            return "mac"
    return None
