"""The SSD tier's start-up: every manifest row checked, the slot map filled in bulk.

A mixin of ``SSDTier`` (kvplug/tiers/ssd.py). Rows are untrusted input: the
manifest drops rows that fail their own check (row_check.py); here each row is
checked (key length, 1..block_tokens tokens, slot in range, sane clock, no
slot named twice) before use; a bad row is dropped and counted, never an
abort. Rows of another fingerprint or format are kept (evicted first) but
never served. The own rows' keys, parents and tokens are kept, as columns,
for the store's index (``entries``), so a large manifest is read once.

Every check is a vector op over the rows' columns: a tier holds millions of
rows, and start-up must take seconds, not tens of them. The one check that
needs a hash per row, that a row's key is the hash of its parent and tokens,
is made by the index when a lookup first reaches the block (index_check.py),
except for a row whose tokens do not fit int32 (checked here: it would
otherwise widen the whole index's token matrix).
"""

from __future__ import annotations

import logging
import sqlite3
import sys
from collections import Counter

import numpy as np

from kvplug.index_bulk import Blocks
from kvplug.keys import FORMAT_VERSION, KEY_BYTES, block_key, hash_key
from kvplug.tiers import slot_header
from kvplug.tiers.slot_index import SlotIndex

log = logging.getLogger("kvplug")

MAX_CLOCK = 1 << 62  # a row's last_access past this is damage (the clock would overflow int64)
_LITTLE = sys.byteorder == "little"  # a row's tokens (<i8) are then the bytes block_key hashes
_PROBLEMS = ("", "key", "tokens", "slot", "clock", "chain", "duplicate_slot")


class SSDStartup:
    def _load(self) -> tuple[SlotIndex, list[bytes]]:
        """Index the manifest's rows; drop (and count) the ones that cannot be right.
        Also returns the keys dropped (for ``on_drop``)."""
        manifest, columns = self._manifest, self._manifest.columns  # intact rows, as read
        keys, parents, tokens, _ = columns.blobs
        ints, order = columns.ints, manifest.order  # order: oldest access first
        n, per_segment, num_slots = len(ints), self.slots_per_segment, self.num_slots
        segment, slot, checksum, fmt, clock = (ints[:, c] for c in range(5))
        # Failed their row check, or held a blob too long to read: deleted by the manifest.
        problems = Counter({"row_check": manifest.dropped_rows, "oversized": manifest.oversized_rows})
        lengths, sides = columns.lengths, columns.sides
        mine_fp = np.frombuffer(self.fingerprint, np.uint8)
        own = (lengths[:, 3] == KEY_BYTES) & (sides[:, 2] == mine_fp).all(axis=1) & (fmt == FORMAT_VERSION)
        tok_bytes = lengths[:, 2]
        count = tok_bytes // 8

        problem = np.zeros(n, np.int8)  # an index into _PROBLEMS, the first that applies
        for code, bad in enumerate((
                (lengths[:, 0] != KEY_BYTES) | (lengths[:, 1] != KEY_BYTES),
                (tok_bytes % 8 != 0) | (count < 1) | (count > self._max_tokens),
                (segment < 0) | (slot < 0) | (slot >= per_segment),
                (clock < 0) | (clock >= MAX_CLOCK)), start=1):
            problem[(problem == 0) & bad] = code
        mine = np.flatnonzero((problem == 0) & own)
        matrix = self._token_matrix(tokens, mine, count[mine])
        wide = np.flatnonzero((matrix < -(2**31)).any(axis=1) | (matrix >= 2**31).any(axis=1))
        for j in wide.tolist():  # the chain check, here for these few
            i = int(mine[j])
            if (hash_key(parents[i] + tokens[i]) if _LITTLE else
                    block_key(parents[i], np.frombuffer(tokens[i], "<i8"))) != keys[i]:
                problem[i] = _PROBLEMS.index("chain")

        # A global slot per row inside the capacity (computed only where it cannot overflow).
        fits = (problem == 0) & (segment <= (num_slots - 1) // per_segment)
        g = np.where(fits, segment * per_segment + slot, -1)
        fits &= g < num_slots
        candidates = order[fits[order]]
        _, first = np.unique(g[candidates], return_index=True)  # the older row (seen first) keeps it
        kept = np.zeros(n, bool)
        kept[candidates[first]] = True
        problem[fits & ~kept] = _PROBLEMS.index("duplicate_slot")
        shrunk = (problem == 0) & ~fits  # capacity shrank since
        for code, k in zip(*np.unique(problem[problem > 0], return_counts=True)):
            problems[_PROBLEMS[code]] += int(k)

        index = SlotIndex(num_slots, tags=self._mac_key is not None,
                          clock=int(clock[clock < MAX_CLOCK].max(initial=0)) if n else 0)
        tags = [] if self._mac_key is None else [
            (int(g[i]), slot_header.meta_digest(keys[i], parents[i], tokens[i]))
            for i in np.flatnonzero(kept & own).tolist()]
        index.load(sides[kept, 0].tobytes(), columns.hashes[kept], g[kept], checksum[kept], ~own[kept],
                   clock[kept], tags)
        del tags

        drop = np.flatnonzero((problem > 0) | shrunk).tolist()
        drop_keys = [keys[i] for i in drop]
        if drop:
            try:
                manifest.delete(drop_keys)
            except sqlite3.Error as err:  # the rows may survive: leave the slots they name unused
                index.hold(s for i in drop if 0 <= (s := int(segment[i]) * per_segment + int(slot[i])) < num_slots)
                log.warning("kvplug SSD tier: could not delete %d bad manifest rows in %s: %s",
                            len(drop), self.path, err)
        index.ready()
        bad = sum(problems.values())
        index.count("corruptions", bad)
        index.count("corruptions_manifest", bad)
        for name, k in problems.items():
            if k:
                index.count(f"corruptions_manifest_{name}", k)
        if bad and index.first("manifest_rows"):
            log.warning("kvplug SSD tier: dropped %d bad manifest rows in %s (%s)", bad, self.path,
                        ", ".join(f"{k}: {v}" for k, v in problems.items() if v))
        index.count("dropped_capacity", int(shrunk.sum()))
        index.count("manifest_resets", int(manifest.reset_reason is not None))

        # The index's blocks: own rows kept, in the order read (an index does not depend on
        # its blocks' order); their chains are checked at first use.
        ours = kept & own
        self._startup_entries = Blocks(
            sides[ours, 0].tobytes(), sides[ours, 1].tobytes(), matrix[ours[mine]],
            count[ours].astype(np.int32), columns.hashes[ours], checked=False)
        manifest.columns = manifest.order = None
        self._segments.prune(self.num_slots)
        return index, [k for k in manifest.dropped_keys + drop_keys if isinstance(k, bytes)]

    @staticmethod
    def _token_matrix(tokens: list[bytes], rows: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """[len(rows), most tokens] int64: each row's tokens, then zeros."""
        width = int(counts.max(initial=1))
        full = counts == width
        matrix = np.zeros((len(rows), width), np.int64)
        at = rows[full].tolist()
        matrix[full] = np.frombuffer(b"".join(map(tokens.__getitem__, at)), "<i8").reshape(len(at), width)
        for j in np.flatnonzero(~full).tolist():  # partial blocks: the tails of prompts
            matrix[j, :counts[j]] = np.frombuffer(tokens[rows[j]], "<i8")
        return matrix
