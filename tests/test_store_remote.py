"""The store's remote write policies against a real Valkey server: write-back sends only what
leaves the CPU tier, fetched blocks are never written back, pins always come back."""

from __future__ import annotations

import os
import signal
import time

import pytest

from kvplug.blocks import StoreEntry
from kvplug.keys import block_key, chain_keys
from kvplug.tools.valkey_server import PASSWORD, USER, Server, stop_all
from store_helpers import LAYOUT, data_for, make


def put_chain(store, tokens) -> None:
    """Store ``tokens`` block by block; a victim written back to the server holds its slot until sent."""
    parent, bt = store.root, LAYOUT.block_tokens
    for i in range(0, len(tokens), bt):
        block = tokens[i:i + bt]
        key = block_key(parent, block)
        if not store.put(parent, block, data_for(key)):
            assert store.remote.flush(5)
            assert store.put(parent, block, data_for(key))
        parent = key


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(str(tmp_path_factory.mktemp("valkey-store"))).start()
    yield s
    stop_all([s])


def remote(server, namespace, monkeypatch, **more) -> dict:
    monkeypatch.setenv("STORE_REMOTE_PW", PASSWORD)
    return dict(remote_url=server.url, remote_username=USER, remote_password="env:STORE_REMOTE_PW",
                remote_namespace=namespace, **more)


def entries_of(root: bytes, tokens: list[int]) -> list[StoreEntry]:
    entries, parent, bt = [], root, LAYOUT.block_tokens
    for i in range(0, len(tokens), bt):
        entries.append(StoreEntry.of(parent, tokens[i:i + bt]))
        parent = entries[-1].key
    return entries


def on_server(server, store, keys) -> list[bool]:
    return [bool(server.client().exists(store.remote.name(k))) for k in keys]


def test_write_back_sends_only_evicted_full_blocks(tmp_path, server, monkeypatch):
    store = make(tmp_path, cpu_blocks=4, **remote(server, "back", monkeypatch, remote_write="back"))
    try:
        tokens = list(range(40))  # 10 full blocks of 4 through a 4-slot CPU tier
        put_chain(store, tokens)
        assert store.remote.flush(5)
        keys = chain_keys(store.root, tokens, LAYOUT.block_tokens)
        resident = [k in store._resident and store._resident[k].visible for k in keys]
        written = on_server(server, store, keys)
        assert written == [not r for r in resident] and any(written) and any(resident)
        assert store.stats()["cpu"]["pinned_blocks"] == 0
    finally:
        store.close()


def test_fetched_blocks_are_not_written_back_when_evicted(tmp_path, server, monkeypatch):
    writer = make(tmp_path, cpu_blocks=16, **remote(server, "refetch", monkeypatch))
    reader = make(tmp_path, cpu_blocks=16, **remote(server, "refetch", monkeypatch, remote_write="back"))
    try:
        tokens = list(range(100, 116))  # 4 full blocks
        put_chain(writer, tokens)
        assert writer.remote.flush(5) and writer.stats()["remote"]["writes_done"] == 4
        keys = chain_keys(writer.root, tokens, LAYOUT.block_tokens)
        fetch = reader.fetch_remote(entries_of(writer.root, tokens))
        assert fetch.wait(5) and fetch.found == 4 and fetch.landed == 4
        n, blocks = reader.get(tokens)
        assert n == 16 and blocks == [data_for(k).tobytes() for k in keys]
        put_chain(reader, list(range(500, 580)))  # 20 own blocks: evict the 4 fetched, then 4 of its own
        assert reader.remote.flush(5)
        assert reader.stats()["remote"]["writes_queued"] == 4  # its own evicted blocks, none it fetched
        assert reader.stats()["cpu"]["pinned_blocks"] == 0
    finally:
        writer.close()
        reader.close()


def test_fetches_and_queued_writes_take_at_most_a_quarter_of_the_cpu_tier(tmp_path, server, monkeypatch):
    writer = make(tmp_path, cpu_blocks=32, **remote(server, "quarter", monkeypatch))
    reader = make(tmp_path, cpu_blocks=8, **remote(server, "quarter", monkeypatch, remote_queue_blocks=100))
    try:
        assert reader.remote_fetch_blocks == 2 and reader.remote._queue_blocks == 2  # clamped: 8 slots / 4
        assert reader.remote._max_fetching == 1  # fetches in flight land 2 blocks at most, together
        tokens = list(range(200, 224))  # 6 full blocks, all on the server
        put_chain(writer, tokens)
        assert writer.remote.flush(5) and writer.stats()["remote"]["writes_done"] == 6
        real, calls = reader.cpu.write_block, []

        def failing(slot, data):  # the second block's copy into its slot fails
            calls.append(slot)
            if len(calls) == 2:
                raise OSError("copy failed")
            real(slot, data)

        reader.cpu.write_block = failing
        fetch = reader.fetch_remote(entries_of(writer.root, tokens))
        assert fetch.wait(5) and (fetch.found, fetch.landed) == (2, 1)  # the block before the failure lands
        assert reader.cpu.stats()["used_slots"] == 1  # the failed block's slot is not left reserved
        reader.cpu.write_block = real
        fetch = reader.fetch_remote(entries_of(writer.root, tokens))
        assert fetch.wait(5) and (fetch.blocks, fetch.found, fetch.landed) == (2, 2, 1)  # the first was there
        assert reader.stats()["remote"]["hit_blocks"] == 4  # 2 a fetch: the rest were never asked for
        assert reader.get(tokens)[0] == 8
    finally:
        writer.close()
        reader.close()


def test_fetches_given_up_on_never_land_and_too_many_are_refused(tmp_path, server, monkeypatch):
    from kvplug.tiers.remote import Link

    writer = make(tmp_path, cpu_blocks=32, **remote(server, "abandon", monkeypatch))
    reader = make(tmp_path, cpu_blocks=128, **remote(server, "abandon", monkeypatch, remote_timeout_s=2.0,
                                                     remote_fetch_blocks=4))  # 32 slots a quarter: 8 fetches
    try:
        tokens = list(range(300, 316))  # 4 full blocks, all on the server
        put_chain(writer, tokens)
        assert writer.remote.flush(5)
        deadline = time.monotonic() + 5
        while reader.remote.link is not Link.UP:  # the start-up probe connected
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(server.process.pid, signal.SIGSTOP)  # replies wait: 2 fetches run, the rest queue
        try:
            fetches = [reader.fetch_remote(entries_of(writer.root, tokens)) for _ in range(8)]
            assert all(fetches) and reader.fetch_remote(entries_of(writer.root, tokens)) is None  # full
            for fetch in fetches:
                fetch.abandon()  # their requests went on without them
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        assert all(f.wait(5) for f in fetches)
        assert [f.landed for f in fetches] == [0] * 8 and reader.get(tokens)[0] == 0
        stats = reader.stats()["remote"]
        assert stats["fetches"] <= 2 and stats["abandoned_blocks"] == 4 * stats["fetches"]  # queued: never sent
        fetch = reader.fetch_remote(entries_of(writer.root, tokens))  # room again
        assert fetch.wait(5) and fetch.landed == 4 and reader.get(tokens)[0] == 16
    finally:
        writer.close()
        reader.close()
