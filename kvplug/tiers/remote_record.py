"""The self-describing record one block is stored as on the remote tier.

The pool is shared by every engine of a deployment (and whoever else can
write to the server), so a record is untrusted input: ``decode`` checks every
field against what the reader asked for and returns why it refused, never a
wrong block. No pickle: a fixed little-endian header, the token ids, the
payload (the block's bytes exactly as the CPU tier holds them: int4h blocks
stay encoded), and a 16-byte checksum over all of it.

    magic "KVPR" | version u16 | codec u8 | mac u8 | tokens u32 | payload bytes u64
    | fingerprint 16 | key 16 | parent 16 | tokens (int64 each) | payload | checksum 16

The checksum is xxh3-128 (corruption); with an integrity secret it is a keyed
BLAKE2b-128 MAC, so only holders of the secret can write records others load.
Its key is derived from the secret (``derive_key``: BLAKE2b's own key is at
most 64 bytes, a configured secret up to 4096), apart from the SSD tier's.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import xxhash

from kvplug.keys import KEY_BYTES, block_key

MAGIC = b"KVPR"
VERSION = 1
CODECS = {"raw": 0, "int4h": 1, "int4kc": 2, "int4kcs": 3}  # every codec of kvplug.codec.CODECS
HEADER = struct.Struct("<4sHBBIQ16s16s16s")
SUM_BYTES = 16
# Why a record was refused: the counters ``RemoteTier.stats`` reports.
REASONS = ("truncated", "magic", "version", "codec", "mac_mode", "fingerprint", "key", "parent", "tokens",
           "size", "checksum")


class BadRecord(ValueError):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def derive_key(secret: bytes) -> bytes:
    """The MAC key for records: a 32-byte subkey of the configured secret (any length), never the
    secret itself, and not the SSD tier's (kvplug/tiers/slot_header.py uses another personalisation)."""
    if not secret:
        raise ValueError("an integrity key must not be empty")
    return hashlib.blake2b(secret, digest_size=32, person=b"kvplug.remote.k").digest()


def _checksum(parts, secret: bytes | None) -> bytes:
    h = hashlib.blake2b(digest_size=SUM_BYTES, key=secret) if secret else xxhash.xxh3_128()
    for part in parts:
        h.update(part)
    return h.digest()


def encode_into(buf: bytearray, fingerprint: bytes, key: bytes, parent: bytes, tokens: np.ndarray, codec: str,
                payload, secret: bytes | None = None) -> memoryview:
    """One record, built in ``buf`` (grown if short; reused by the writer: no fresh pages per
    block); ``payload`` is any buffer (a CPU slot's view), copied once, here."""
    payload = np.frombuffer(memoryview(payload).cast("B"), dtype=np.uint8)
    toks = np.ascontiguousarray(tokens, dtype="<i8")
    toks_end = HEADER.size + 8 * len(toks)
    body_end = toks_end + payload.size
    if len(buf) < body_end + SUM_BYTES:
        buf.extend(bytes(body_end + SUM_BYTES - len(buf)))
    view = memoryview(buf)[:body_end + SUM_BYTES]
    HEADER.pack_into(view, 0, MAGIC, VERSION, CODECS[codec], 1 if secret else 0, len(toks), payload.size,
                     fingerprint, key, parent)
    view[HEADER.size:toks_end] = toks.tobytes()
    np.frombuffer(view, dtype=np.uint8, count=payload.size, offset=toks_end)[:] = payload
    view[body_end:] = _checksum((view[:body_end],), secret)
    return view


def encode(fingerprint: bytes, key: bytes, parent: bytes, tokens: np.ndarray, codec: str, payload,
           secret: bytes | None = None) -> bytes:
    """One record as bytes."""
    return bytes(encode_into(bytearray(), fingerprint, key, parent, tokens, codec, payload, secret))


def decode(record: bytes, *, fingerprint: bytes, key: bytes, parent: bytes, tokens: np.ndarray, codec: str,
           payload_bytes: int, secret: bytes | None = None) -> memoryview:
    """The payload of a record that is exactly the block asked for; else ``BadRecord(reason)``."""
    view = memoryview(record)
    if len(view) < HEADER.size + SUM_BYTES:
        raise BadRecord("truncated")
    magic, version, codec_id, mac, n, size, fp, rkey, rparent = HEADER.unpack_from(view)
    if magic != MAGIC:
        raise BadRecord("magic")
    if version != VERSION:
        raise BadRecord("version")
    if codec_id != CODECS[codec]:
        raise BadRecord("codec")
    if mac != (1 if secret else 0):
        raise BadRecord("mac_mode")  # an unkeyed record where a MAC is required, or the reverse
    if len(view) != HEADER.size + 8 * n + size + SUM_BYTES:
        raise BadRecord("truncated")
    if size != payload_bytes:
        raise BadRecord("size")
    if fp != fingerprint:
        raise BadRecord("fingerprint")
    if rkey != key:
        raise BadRecord("key")
    if rparent != parent:
        raise BadRecord("parent")
    toks_end = HEADER.size + 8 * n
    rtokens = np.frombuffer(view[HEADER.size:toks_end], dtype="<i8")
    if len(rtokens) != len(tokens) or not np.array_equal(rtokens, tokens):
        raise BadRecord("tokens")
    if len(key) != KEY_BYTES or block_key(rparent, rtokens) != rkey:
        raise BadRecord("key")  # the key is not the hash of its parent and tokens
    body_end = toks_end + size
    if _checksum((view[:body_end],), secret) != bytes(view[body_end:]):
        raise BadRecord("checksum")
    return view[toks_end:body_end]
