"""Slot geometry shared by the CPU and SSD tiers.

A slot holds one block's bytes at offset 0, then a small header (written by
the SSD tier), padded to a multiple of 4096 so that O_DIRECT can read an SSD
slot straight into a CPU slot with no bounce buffer.
"""

ALIGN = 4096
HEADER_BYTES = 128


def round_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


def slot_stride(block_bytes: int) -> int:
    """Bytes of one slot (CPU or SSD) for blocks of ``block_bytes``."""
    return round_up(block_bytes + HEADER_BYTES)
