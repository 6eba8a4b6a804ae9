"""Two engines (each both halves, its own CPU tier, no SSD) sharing one real Valkey server:
engine B loads what engine A stored, without a network round trip on the scheduler thread;
a slow, stopped or absent server degrades to recompute."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from kvplug.tools.valkey_server import PASSWORD, USER, Server, free_port, stop_all
from test_halves import NAMES, Engine

PROMPT = list(range(700, 748))  # 3 full blocks of 16
T = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(str(tmp_path_factory.mktemp("valkey"))).start()
    yield s
    stop_all([s])


@pytest.fixture
def password(monkeypatch):
    monkeypatch.setenv("TEST_REMOTE_PW", PASSWORD)


def remote(url: str, namespace: str, **more) -> dict:
    return {"remote_url": url, "remote_username": USER, "remote_password": "env:TEST_REMOTE_PW",
            "remote_namespace": namespace, "remote_retry_s": 0.2, **more}


def serve_and_store(e: Engine, rid: str, tokens: list[int]):
    a = e.request(rid, tokens)
    assert ask_until_answered(e, a)[0] == 0  # a miss on the server too (asked in the background)
    e.step({a: len(tokens)})
    return a


def ask_until_answered(e: Engine, req, timeout: float = 5.0) -> tuple[int, int]:
    """get_num_new_matched_tokens until it stops saying "ask again": (tokens, times asked)."""
    asked, deadline = 0, time.monotonic() + timeout
    while True:
        asked += 1
        t0 = time.monotonic()
        n, _ = e.sched.get_num_new_matched_tokens(req, 0)
        assert time.monotonic() - t0 < 0.05  # never waits on the network itself
        if n is not None:
            return n, asked
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_engine_b_loads_what_engine_a_stored(tmp_path, server, password):
    a_engine = Engine(tmp_path, "a", **remote(server.url, "halves"))
    b_engine = Engine(tmp_path, "b", **remote(server.url, "halves"))
    try:
        a = serve_and_store(a_engine, "a", PROMPT)
        assert a_engine.sched.store.remote.flush(5)
        assert a_engine.sched.store.stats()["remote"]["writes_done"] == 3
        again = a_engine.request("a2", PROMPT)  # block-aligned, all of it a local hit: nothing to fetch
        assert ask_until_answered(a_engine, again) == (len(PROMPT) - 1, 1)
        assert a_engine.sched.stats.data["remote_fetches"] == 1  # the cold request's only

        skip = b_engine.request("b0", PROMPT)
        skip.skip_reading_prefix_cache = True  # vLLM discards any hit for it: nothing to fetch either
        assert ask_until_answered(b_engine, skip) == (0, 1)
        assert b_engine.sched.stats.data.get("remote_fetches", 0) == 0
        b = b_engine.request("b", PROMPT)
        n, asked = ask_until_answered(b_engine, b)
        assert asked >= 2 and n == len(PROMPT) - 1  # "ask again" first, then the fetched blocks as CPU hits
        b_engine.sched.update_state_after_alloc(b, _blocks(b_engine, "b"), n)
        b.num_computed_tokens = n
        meta, _, errors = b_engine.step({b: 1})
        assert not errors and [len(j.block_ids) for j in meta.loads] == [3]
        for pos in range(len(PROMPT) - 1):
            for name in NAMES:
                assert torch.equal(b_engine.kv_of(b, pos, name), a_engine.kv_of(a, pos, name))
        stats = b_engine.sched.store.stats()
        assert stats["remote"]["promotions"] == 3 and b_engine.sched.stats.data["remote_fetched_blocks"] == 3
        assert stats["remote"]["writes_queued"] == 0  # fetched blocks are not written back
        assert stats["cpu"]["pinned_blocks"] == 0
    finally:
        a_engine.close()
        b_engine.close()


def test_another_namespace_shares_nothing(tmp_path, server, password):
    a_engine = Engine(tmp_path, "a", **remote(server.url, "ns-one"))
    b_engine = Engine(tmp_path, "b", **remote(server.url, "ns-two"))
    try:
        serve_and_store(a_engine, "a", PROMPT)
        assert a_engine.sched.store.remote.flush(5)
        n, _ = ask_until_answered(b_engine, b_engine.request("b", PROMPT))
        assert n == 0
    finally:
        a_engine.close()
        b_engine.close()


def test_a_stalled_server_degrades_to_recompute_at_the_deadline(tmp_path, password):
    s = Server(str(tmp_path / "stall")).start()
    e = Engine(tmp_path, "e", **remote(s.url, "stall", remote_timeout_s=2.0), promotion_timeout_s=0.3)
    try:
        time.sleep(0.2)  # the start-up probe connected
        os.kill(s.process.pid, signal.SIGSTOP)
        b = e.request("b", PROMPT)
        assert e.sched.get_num_new_matched_tokens(b, 0) == (None, False)  # fetching in the background
        t0 = time.monotonic()
        n, _ = ask_until_answered(e, b)
        assert n == 0 and time.monotonic() - t0 < 1.0  # recomputes once the deadline (0.3 s) passed
        assert e.sched.stats.data["remote_timeouts"] == 1
        assert e.sched.get_num_new_matched_tokens(b, 0) == (0, False)  # and never waits again
    finally:
        os.kill(s.process.pid, signal.SIGCONT)
        e.close()
        stop_all([s])


def test_server_down_at_start_costs_nothing_then_reconnects(tmp_path, password):
    s = Server(str(tmp_path / "late"))
    s.port = free_port()
    a_engine = Engine(tmp_path, "a", **remote(s.url, "late"))
    try:
        time.sleep(0.1)  # the start-up probe failed: degraded
        assert a_engine.sched.store.stats()["remote"]["degraded"] == 1
        a = a_engine.request("a", PROMPT)
        assert a_engine.sched.get_num_new_matched_tokens(a, 0) == (0, False)  # no fetch while it is down
        s.start()
        time.sleep(0.3)  # remote_retry_s passed: the next operation reconnects
        a_engine.step({a: len(PROMPT)})  # its saves are written through
        assert a_engine.sched.store.remote.flush(5)
        assert a_engine.sched.store.stats()["remote"]["degraded"] == 0
        b_engine = Engine(tmp_path, "b", **remote(s.url, "late"))
        try:
            n, _ = ask_until_answered(b_engine, b_engine.request("b", PROMPT))
            assert n == len(PROMPT) - 1
        finally:
            b_engine.close()
    finally:
        a_engine.close()
        stop_all([s])


def _blocks(e: Engine, rid: str):
    from types import SimpleNamespace

    return SimpleNamespace(get_block_ids=lambda: (e.blocks[rid],))


def test_int4h_blocks_travel_encoded_and_load_as_a_local_hit_would(tmp_path, server, password):
    from kvplug.tiers import remote_record

    a_engine = Engine(tmp_path, "a", codec="int4h", **remote(server.url, "int4h"))
    b_engine = Engine(tmp_path, "b", codec="int4h", **remote(server.url, "int4h"))
    try:
        serve_and_store(a_engine, "a", PROMPT)
        assert a_engine.sched.store.remote.flush(5)
        geo = a_engine.geo
        key = a_engine.sched._reqs["a"].key(0)
        record = server.client().get(a_engine.sched.store.remote.name(key))
        assert len(record) == remote_record.HEADER.size + 8 * T + geo.block_bytes + remote_record.SUM_BYTES
        assert geo.block_bytes < geo.layout.raw_block_bytes()  # encoded (2x here at head_size 8; 3.76x at 128)
        local = a_engine.request("a2", PROMPT)  # a CPU-tier hit in A: decoded from the same bytes
        assert ask_until_answered(a_engine, local)[0] == len(PROMPT) - 1
        a_engine.step({local: 1})
        b = b_engine.request("b", PROMPT)
        assert ask_until_answered(b_engine, b)[0] == len(PROMPT) - 1
        b_engine.step({b: 1})
        for pos in range(len(PROMPT) - 1):
            for name in NAMES:
                assert torch.equal(b_engine.kv_of(b, pos, name), a_engine.kv_of(local, pos, name))
    finally:
        a_engine.close()
        b_engine.close()
