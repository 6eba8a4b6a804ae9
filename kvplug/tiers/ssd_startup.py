"""The SSD tier's start-up: every manifest row checked, the slot map filled in bulk.

A mixin of ``SSDTier`` (kvplug/tiers/ssd.py). Rows are untrusted input: each
one is checked (key length, 1..block_tokens tokens, slot in range, sane
clock, key = hash of parent and tokens, no slot named twice) before use; a
bad row is dropped and counted, never an abort. Rows of another fingerprint
or format are kept (evicted first) but never served. The own rows' keys,
parents and tokens are kept for the store's index (``entries``), so a large
manifest is read once.
"""

from __future__ import annotations

import logging
import sqlite3
import sys
from collections import Counter

import numpy as np

from kvplug.keys import FORMAT_VERSION, KEY_BYTES, block_key, hash_key
from kvplug.tiers import slot_header
from kvplug.tiers.slot_index import SlotIndex

log = logging.getLogger("kvplug")

MAX_CLOCK = 1 << 62  # a row's last_access past this is damage (the clock would overflow int64)
_LITTLE = sys.byteorder == "little"  # a row's tokens (<i8) are then the bytes block_key hashes


class SSDStartup:
    def _row_problem(self, key: bytes, parent: bytes, tokens: bytes, segment: int, slot: int,
                     last_access: int) -> str | None:
        """What makes a manifest row unusable (None: nothing). Rows are untrusted input."""
        if len(key) != KEY_BYTES:
            return "key"
        n, odd = divmod(len(tokens), 8)
        if odd or not 1 <= n <= self._max_tokens:
            return "tokens"
        if segment < 0 or not 0 <= slot < self.slots_per_segment:
            return "slot"
        if not 0 <= last_access < MAX_CLOCK:
            return "clock"
        if (hash_key(parent + tokens) if _LITTLE else block_key(parent, np.frombuffer(tokens, "<i8"))) != key:
            return "chain"  # the key is not its parent's and tokens' hash: a lookup would mismatch
        return None

    def _load(self) -> tuple[SlotIndex, list[bytes]]:
        """Index the manifest's rows; drop (and count) the ones that cannot be right.
        Also returns the keys dropped (for ``on_drop``)."""
        manifest = self._manifest
        # Failed their row check, or held a blob too long to read: deleted by the manifest.
        problems = Counter({"row_check": manifest.dropped_rows, "oversized": manifest.oversized_rows})
        index = SlotIndex(self.num_slots, tags=self._mac_key is not None,
                          clock=max((r[8] for r in manifest.rows if 0 <= r[8] < MAX_CLOCK), default=0))
        used, drop, shrunk, kept = bytearray(self.num_slots), [], 0, []
        keys, slots, checksums, foreign, clocks, tags = [], [], [], [], [], []
        per_segment, num_slots, mine, fmt_now = self.slots_per_segment, self.num_slots, self.fingerprint, FORMAT_VERSION
        for key, parent, tokens, segment, slot, checksum, fingerprint, fmt, last_access, _ in manifest.rows:
            problem = self._row_problem(key, parent, tokens, segment, slot, last_access)
            g = segment * per_segment + slot
            if problem is None and g < num_slots and used[g]:
                problem = "duplicate_slot"  # the older row (seen first) keeps it
            if problem is not None:
                problems[problem] += 1
                drop.append(key)
            elif not 0 <= g < num_slots:
                shrunk += 1
                drop.append(key)  # capacity shrank since
            else:
                used[g] = 1
                is_foreign = fingerprint != mine or fmt != fmt_now
                keys.append(key)
                slots.append(g)
                checksums.append(checksum)
                foreign.append(is_foreign)
                clocks.append(last_access)
                if self._mac_key is not None:
                    tags.append(None if is_foreign else slot_header.meta_digest(key, parent, tokens))
                if not is_foreign:
                    kept.append((key, parent, tokens))
        index.load(keys, slots, checksums, foreign, clocks, tags)
        del keys, slots, checksums, foreign, clocks, tags
        if drop:
            try:
                manifest.delete(drop)
            except sqlite3.Error as err:  # the rows may survive: leave the slots they name unused
                dropped_keys = set(drop)
                index.hold(g for r in manifest.rows if r[0] in dropped_keys
                           and 0 <= (g := r[3] * per_segment + r[4]) < num_slots)
                log.warning("kvplug SSD tier: could not delete %d bad manifest rows in %s: %s",
                            len(drop), self.path, err)
        index.ready()
        bad = sum(problems.values())
        index.count("corruptions", bad)
        index.count("corruptions_manifest", bad)
        for problem, n in problems.items():
            if n:
                index.count(f"corruptions_manifest_{problem}", n)
        if bad and index.first("manifest_rows"):
            log.warning("kvplug SSD tier: dropped %d bad manifest rows in %s (%s)", bad, self.path,
                        ", ".join(f"{k}: {n}" for k, n in problems.items() if n))
        index.count("dropped_capacity", shrunk)
        index.count("manifest_resets", int(manifest.reset_reason is not None))
        manifest.rows = []
        self._startup_entries = kept  # entries() hands them out once, unless blocks come or go first
        self._segments.prune(self.num_slots)
        return index, [k for k in manifest.dropped_keys + drop if isinstance(k, bytes)]
