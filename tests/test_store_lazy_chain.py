"""A manifest row whose key is not the hash of its parent and tokens, checked at first use.

Start-up checks every row's own integrity in bulk but leaves the chain check
(a SHA-256 per row) to the index, at the first lookup that reaches the block
(kvplug/index_check.py). A row that fails it, consistent in every other way
(valid row check, slot and checksum), is never part of a hit: the lookup stops
before it, the row is dropped and counted, and the hit stays the same after.
"""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from kvplug import index_bulk
from kvplug.config import KVPlugConfig
from kvplug.index import PrefixIndex
from kvplug.keys import chain_keys
from kvplug.store import TieredStore
from kvplug.tiers.manifest import Row
from store_helpers import BLOCK, LAYOUT, ROOT, STRIDE, check_bytes, put_chain

COLUMNS = ", ".join(Row._fields)
TOKENS = list(range(100, 110))  # blocks of 4, 4 and a 2-token tail


def open_store(tmp_path) -> TieredStore:
    config = KVPlugConfig(cpu_bytes=4 * STRIDE, shared_memory=False, ssd_path=str(tmp_path / "ssd"),
                          ssd_bytes=64 * STRIDE, o_direct="off")
    return TieredStore(config, LAYOUT, BLOCK, ROOT)


def rewrite_tokens(tmp_path, key: bytes, tokens: list[int]) -> None:
    """Give ``key``'s row other tokens, with a valid row check: only the chain is wrong."""
    conn = sqlite3.connect(tmp_path / "ssd" / "manifest.sqlite3")
    with conn:
        row = Row(*conn.execute(f"SELECT {COLUMNS} FROM blocks WHERE key = ?", (key,)).fetchone())
        row = row._replace(tokens=np.array(tokens, "<i8").tobytes())
        conn.execute(f"INSERT OR REPLACE INTO blocks ({COLUMNS}, row_check) VALUES (?,?,?,?,?,?,?,?,?,?)",
                     row.with_check())
    conn.close()


def rows(tmp_path) -> int:
    conn = sqlite3.connect(tmp_path / "ssd" / "manifest.sqlite3")
    try:
        return conn.execute("SELECT COUNT(*) FROM blocks").fetchone()[0]
    finally:
        conn.close()


@pytest.mark.parametrize("bad", [1, 2], ids=["full_block", "partial_tail"])
def test_a_row_that_does_not_chain_is_a_counted_miss(tmp_path, bad):
    store = open_store(tmp_path)
    keys = put_chain(store, TOKENS)
    store.close()
    # The full block gets the tokens of another block; the tail the ones a query will share.
    rewrite_tokens(tmp_path, keys[bad], [7, 7, 7, 7] if bad == 1 else [108, 42])
    store = open_store(tmp_path)
    try:
        s = store.stats()["ssd"]
        assert s["blocks"] == 3 and s["corruptions"] == 0  # start-up leaves the chain to first use
        query = TOKENS[:8] + [108, 42, 5] if bad == 2 else TOKENS
        for _ in range(2):  # the first lookup finds it out; the second no longer sees it
            hit = store.lookup(query)
            assert hit.num_tokens == 4 * bad and [b.key for b in hit.blocks] == keys[:bad]
        s = store.stats()["ssd"]
        assert s["corruptions_manifest_chain"] == 1 and s["corruptions_manifest"] == 1 and s["blocks"] == 2
        check_bytes(store, TOKENS, 4 * bad)
        assert store.lookup(TOKENS[:4 * bad] + [1]).num_tokens == 4 * bad  # the good blocks still serve
    finally:
        store.close()
    assert rows(tmp_path) == 2  # its row is gone


def test_the_next_best_sibling_serves_a_partial_hit(tmp_path):
    """Two tails under one parent; the one that shares more fails its check: the other serves."""
    store = open_store(tmp_path)
    keys = put_chain(store, TOKENS[:4] + [1, 2])
    put_chain(store, TOKENS[:4] + [1, 9, 9])
    other = chain_keys(ROOT, TOKENS[:4] + [1, 9, 9], 4, partial=True)[1]
    store.close()
    rewrite_tokens(tmp_path, other, [1, 2, 3])  # now claims to share 3 tokens with the query
    store = open_store(tmp_path)
    try:
        hit = store.lookup(TOKENS[:4] + [1, 2, 3, 5])
        assert [b.key for b in hit.blocks] == keys and hit.num_tokens == 6
        assert store.stats()["ssd"]["corruptions_manifest_chain"] == 1
    finally:
        store.close()


def test_index_checks_bulk_loaded_blocks_once():
    keys = chain_keys(ROOT, list(range(12)), 4)
    blocks = [(k, ROOT if i == 0 else keys[i - 1], np.arange(4 * i, 4 * i + 4)) for i, k in enumerate(keys)]
    blocks[2] = (blocks[2][0], blocks[2][1], np.array([0, 0, 0, 0]))  # does not chain
    columns = index_bulk.Blocks.of(blocks)
    columns.checked = False
    index = PrefixIndex(ROOT, 4)
    assert index_bulk.load(index, columns) == 3
    assert index.match(list(range(12))) == [(keys[0], 4), (keys[1], 4)]
    assert index.bad == [keys[2]] and keys[2] not in index
    assert bytes(index._checked[:2]) == b"\1\1"  # checked once: later matches compare nothing


def test_a_block_made_by_its_caller_replaces_an_unchecked_row_of_its_key():
    """A forged row (its key, other tokens) loaded unchecked, then the real block stored: the real
    one is kept and served; the forged row never takes it down at its check."""
    keys = chain_keys(ROOT, list(range(8)), 4)
    forged = index_bulk.Blocks.of([(keys[0], ROOT, np.array([9, 9, 9, 9]))])
    forged.checked = False
    index = PrefixIndex(ROOT, 4)
    assert index_bulk.load(index, forged) == 1
    assert index.insert(keys[0], ROOT, list(range(4)))   # the caller made keys[0] from these
    assert index.insert(keys[1], keys[0], list(range(4, 8)))
    assert index.match(list(range(8))) == [(keys[0], 4), (keys[1], 4)] and index.bad == []
    assert not index.insert(keys[0], ROOT, list(range(4)))  # checked now: stored once
