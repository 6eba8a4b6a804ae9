"""RemoteTier: KV blocks in a Valkey / Redis server or cluster shared by every engine of a deployment.

Each block is one string value (kvplug/tiers/remote_record.py) under
``<namespace>:<key hex>``. The server may evict anything at any time
(``maxmemory`` + ``allkeys-lru``): a missing block is a miss, and so is a
record that fails any check (another model's, truncated, overwritten with
garbage), counted by reason.

Nothing here blocks its caller on the network: ``fetch`` runs one pipelined
round trip (one GET per block; on a cluster one pipeline per node that owns
some: remote_pipeline.py, a dead node costs only its keys) on a reader
thread and returns a future, or None when ``fetches_in_flight`` are queued
or running already; ``put`` queues a write for the writer thread, which sends
batches in pipelines, and drops it (counted) when ``queue_blocks`` writes are
queued or being sent, or the server is down. Writes go out in pipelines of
at most ``PIPELINE_BYTES`` (a large record alone).

The connection is a small state machine:

    DOWN(retry_at) ──an operation at or after retry_at succeeds──► UP
       ▲                                                          │
       └───────────── any operation fails (timeout, refused) ─────┘

While DOWN, fetches miss and writes drop at once, without touching the
network, until ``retry_s`` has passed; then the next operation probes. The
tier starts DOWN with retry_at = now and probes once in the background, so an
engine starts whether or not the server is up, and reports ``degraded``.

Client: redis-py with hiredis (the reference client, maintained by Redis,
speaks to Valkey as well, has a C reply parser and a cluster client,
``redis.cluster.RedisCluster``, whose slot map remote_pipeline.py groups keys
by, following MOVED / ASK itself); valkey-glide would add a Rust core and its
own runtime for no gain at these request sizes.
"""

from __future__ import annotations

import concurrent.futures as cf
import enum
import logging
import queue
import random
import threading
import time
from collections import Counter
from typing import Callable, NamedTuple, Sequence

import numpy as np

from kvplug.tiers import remote_record
from kvplug.tiers.remote_pipeline import NodePipelines, by_bytes
from kvplug.tiers.remote_url import RemoteURL

log = logging.getLogger("kvplug")

WRITE_BATCH = 16  # records the writer takes from its queue at once: bounded memory per batch
# Bytes per write pipeline: small records share a round trip; a record this large goes alone. The
# server copies a pipelined large value out of its query buffer (a lone one it adopts without a copy),
# so pipelining 1.5 MiB records ran at half a plain SET loop here (bench/remote.py).
PIPELINE_BYTES = 64 << 10
# Most fetches queued or running (on 2 reader threads); past this a request does not wait for the
# server (fetch answers None): a burst of requests never builds a queue that outlives their deadlines.
FETCHES_IN_FLIGHT = 8


class Wanted(NamedTuple):
    """A block a fetch asks for: what its record must say."""
    key: bytes
    parent: bytes
    tokens: np.ndarray


class _Write(NamedTuple):
    key: bytes
    parent: bytes
    tokens: np.ndarray
    payload: object                    # a buffer valid until ``done`` is called (a pinned CPU slot)
    done: Callable[[bool], None]


class Link(enum.Enum):
    UP = "up"
    DOWN = "down"


class RemoteTier:
    def __init__(self, url: RemoteURL, *, fingerprint: bytes, block_bytes: int, codec: str,
                 namespace: str = "kvplug", cluster: bool | None = None, username: str | None = None,
                 password: str | None = None, timeout_s: float = 0.5, retry_s: float = 5.0,
                 tls_ca_file: str | None = None,
                 queue_blocks: int = 256, secret: bytes | None = None, fetches_in_flight: int = FETCHES_IN_FLIGHT):
        self.url, self.fingerprint, self.block_bytes, self.codec = url, fingerprint, block_bytes, codec
        self.cluster = len(url.nodes) > 1 if cluster is None else cluster
        self._prefix = f"{namespace}:".encode()
        self._auth = {"username": username, "password": password}  # never logged
        self._timeout_s, self._retry_s = timeout_s, retry_s
        self._tls = {"ssl_ca_certs": tls_ca_file} if url.tls and tls_ca_file else {}  # else the system's CAs
        self._secret = None if secret is None else remote_record.derive_key(secret)  # any length of secret
        self._lock = threading.Lock()
        self._connecting = threading.Lock()  # one connection attempt at a time (reader and writer threads)
        self._idle = threading.Condition(self._lock)  # no write queued or in flight
        self._in_flight = 0  # writes queued or being sent: each pins a CPU slot, at most queue_blocks
        self._queue_blocks = queue_blocks
        self._fetching, self._max_fetching = 0, fetches_in_flight  # fetches queued or running
        self._abandon_writes = False  # close() ran out of time: complete what is left unsent
        self._client = None
        self.link, self._retry_at = Link.DOWN, time.monotonic()
        self._counts: Counter = Counter()
        self._queue: queue.Queue[_Write | None] = queue.Queue()  # bounded by _in_flight, in put
        self._reader = cf.ThreadPoolExecutor(2, thread_name_prefix="kvplug-remote-read")
        self._nodes = NodePipelines(self.cluster, retry_s)
        self._buffers = [bytearray() for _ in range(WRITE_BATCH)]  # the writer's records, reused
        self._writer = threading.Thread(target=self._write_loop, name="kvplug-remote-write", daemon=True)
        self._writer.start()
        self._closed = False
        self._reader.submit(self._probe)

    def name(self, key: bytes) -> bytes:
        return self._prefix + key.hex().encode()

    def available(self) -> bool:
        """Up, or down but due a probe: worth asking (no network here)."""
        return self.link is Link.UP or time.monotonic() >= self._retry_at

    # -- reads ----------------------------------------------------------------------

    def fetch(self, wanted: Sequence[Wanted]) -> cf.Future | None:
        """A future of one payload (a memoryview) or None per block, in order: one round trip.
        None (nothing asked) when ``fetches_in_flight`` are queued or running already."""
        with self._lock:
            if self._fetching >= self._max_fetching or self._closed:
                self._counts["fetches_refused_busy"] += 1
                return None
            self._fetching += 1
        try:
            future = self._reader.submit(self._fetch, list(wanted))
        except RuntimeError:  # closed meanwhile
            self._fetch_ended(None)
            return None
        future.add_done_callback(self._fetch_ended)  # run, failed or cancelled
        return future

    def _fetch_ended(self, _future) -> None:
        with self._lock:
            self._fetching -= 1

    def _fetch(self, wanted: list[Wanted]) -> list[memoryview | None]:
        out: list[memoryview | None] = [None] * len(wanted)
        client = self._usable()
        if client is None:
            self._count(fetches_skipped_down=1, miss_blocks=len(wanted))
            return out
        names = [self.name(w.key) for w in wanted]
        try:
            records, ran = self._nodes.run(client, names, lambda pipe, i: pipe.get(names[i]))
        except Exception as e:  # refused, timed out, every node down: a miss, and the link is down
            self._failed("fetch", e)
            self._count(fetch_errors=1, miss_blocks=len(wanted))
            return out
        self._up()
        counts: Counter = Counter(fetches=1) + ran
        for i, (w, record) in enumerate(zip(wanted, records)):
            if record is None or isinstance(record, Exception):  # evicted, never stored, or its node failed
                counts["miss_blocks"] += 1
                continue
            try:
                out[i] = remote_record.decode(record, fingerprint=self.fingerprint, key=w.key, parent=w.parent,
                                              tokens=w.tokens, codec=self.codec, payload_bytes=self.block_bytes,
                                              secret=self._secret)
                counts["hit_blocks"] += 1
                counts["bytes_read"] += len(record)
            except remote_record.BadRecord as bad:
                counts["bad_records"] += 1
                counts[f"bad_{bad.reason}"] += 1
        self._count(**counts)
        return out

    # -- writes ---------------------------------------------------------------------

    def put(self, key: bytes, parent: bytes, tokens: np.ndarray, payload, done: Callable[[bool], None]) -> bool:
        """Queue a write; False (``done`` never called) when dropped: queue full, server down, closed."""
        if self._closed or (self.link is Link.DOWN and time.monotonic() < self._retry_at):
            self._count(writes_dropped=1)
            return False
        with self._idle:
            if self._closed or self._in_flight >= self._queue_blocks:  # (closed: no sentinel passed yet)
                self._counts["writes_dropped"] += 1
                return False
            self._queue.put_nowait(_Write(key, parent, tokens, payload, done))
            self._in_flight += 1
            self._counts["writes_queued"] += 1
        return True

    def _write_loop(self) -> None:
        stop = False
        while not stop:
            batch = [item] if (item := self._queue.get()) is not None else []
            stop = item is None
            while not stop and len(batch) < WRITE_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                stop = item is None
                if item is not None:
                    batch.append(item)
            if self._abandon_writes:  # close() ran out of time: nothing more goes out
                self._count(writes_dropped=len(batch))
                results = [False] * len(batch)
            else:
                results = self._write(batch) if batch else []
            for write, ok in zip(batch, results):
                try:
                    write.done(ok)
                except Exception:
                    log.exception("kvplug remote: a write's completion failed")
            with self._idle:
                self._in_flight -= len(batch)
                self._idle.notify_all()

    def _write(self, batch: list[_Write]) -> list[bool]:
        client = self._usable()
        if client is None:
            self._count(writes_dropped=len(batch))
            return [False] * len(batch)
        ok, records, sent = [False] * len(batch), [], []
        for i, (w, buf) in enumerate(zip(batch, self._buffers)):
            try:
                records.append(remote_record.encode_into(buf, self.fingerprint, w.key, w.parent, w.tokens,
                                                         self.codec, w.payload, self._secret))
                sent.append(i)
            except Exception:  # a record that cannot be built is this write's failure, not the server's
                log.exception("kvplug remote: a record could not be built")
                self._count(writes_failed=1)
        if not sent:
            return ok
        names = [self.name(batch[i].key) for i in sent]
        counts: Counter = Counter()
        for lo, hi in by_bytes(records, PIPELINE_BYTES):
            try:
                results, ran = self._nodes.run(client, names[lo:hi],
                                               lambda pipe, j, lo=lo: pipe.set(names[lo + j], records[lo + j]))
            except Exception as e:  # the server failed: never the thread; the rest of the batch is not sent
                self._failed("write", e)
                counts["writes_failed"] += len(sent) - lo
                break
            self._up()
            counts += ran
            for i, r, rec in zip(sent[lo:hi], results, records[lo:hi]):
                ok[i] = not isinstance(r, Exception)
                counts["writes_done" if ok[i] else "writes_failed"] += 1
                counts["bytes_written"] += len(rec) if ok[i] else 0
        self._count(**counts)
        return ok

    # -- the link -----------------------------------------------------------------------

    def _usable(self):
        """The client when the link is up or due a probe; None while it is left alone."""
        with self._lock:
            if self.link is Link.DOWN and time.monotonic() < self._retry_at:
                return None
            client = self._client
        if client is not None:
            return client
        with self._connecting:  # the reader and writer threads would each open a client (one left open)
            with self._lock:
                if self._client is not None:
                    return self._client
            try:
                client = self._connect()
            except Exception as e:
                self._failed("connect", e)
                return None
            with self._lock:
                self._client = client
        return client

    def _connect(self):
        import redis  # the remote extra: imported only when a remote tier is configured
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        common = dict(**self._auth, ssl=self.url.tls, socket_timeout=self._timeout_s,
                      socket_connect_timeout=self._timeout_s, retry=Retry(NoBackoff(), 0), **self._tls)
        if self.cluster:
            from redis.cluster import ClusterNode, RedisCluster
            # Connects now (reads the slot map); nodes that fail later are found again by MOVED or a refresh.
            return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in self.url.nodes],
                                require_full_coverage=False, **common)
        (host, port), = self.url.nodes
        return redis.Redis(host=host, port=port, db=self.url.db, **common)

    def _probe(self) -> None:
        client = self._usable()
        if client is not None:
            try:
                self._ping(client)
                self._up()
            except Exception as e:
                self._failed("ping", e)

    def _ping(self, client) -> None:
        """One node answers. A cluster's primaries are tried in a random order until one does: a
        cluster with a dead node still serves the others' keys (redis-py's PING asks every node)."""
        if not self.cluster:
            client.ping()
            return
        nodes = client.get_primaries()
        random.shuffle(nodes)
        for node in nodes:
            try:
                client.get_redis_connection(node).ping()
                return
            except Exception as e:
                error = e
        raise error if nodes else ConnectionError("the cluster's slot map names no primary")

    def _up(self) -> None:
        with self._lock:
            was, self.link = self.link, Link.UP
        if was is Link.DOWN:
            self._count(connects=1)
            log.info("kvplug remote: connected to %s", self.url)

    def _failed(self, what: str, error: BaseException) -> None:
        stale = None
        with self._lock:
            was, self.link = self.link, Link.DOWN
            self._retry_at = time.monotonic() + self._retry_s
            if self.cluster:
                stale, self._client = self._client, None  # every node failed: a new slot map at the next probe
        if stale is not None:
            _close_quietly(stale)
        if was is Link.UP or not self._counts["link_errors"]:
            log.warning("kvplug remote: %s to %s failed (%s); the remote tier misses until it answers "
                        "again (next try in %.0f s)", what, self.url, type(error).__name__, self._retry_s)
        self._count(link_errors=1)

    # -- stats and lifetime -------------------------------------------------------------

    def _count(self, **counts: int) -> None:
        with self._lock:
            self._counts.update(counts)

    def bytes_moved(self) -> tuple[int, int]:
        """(bytes read, bytes written) so far: two counters, cheap enough for every step."""
        with self._lock:
            return self._counts.get("bytes_read", 0), self._counts.get("bytes_written", 0)

    def stats(self) -> dict[str, int | float | str]:
        with self._lock:
            counts = dict(self._counts)
            link = self.link
        keys = ("fetches", "fetches_skipped_down", "fetch_errors", "hit_blocks", "miss_blocks", "bad_records",
                "writes_queued", "writes_done", "writes_failed", "writes_dropped", "bytes_read", "bytes_written",
                "connects", "link_errors", "node_errors", "redirects", "slot_map_refreshes", "fetches_refused_busy")
        out = {k: counts.get(k, 0) for k in keys}
        out |= {f"bad_{r}": counts.get(f"bad_{r}", 0) for r in remote_record.REASONS}
        out["degraded"] = int(link is Link.DOWN)
        out["write_queue"] = self._queue.qsize()
        return out

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the write queue is empty; False if it was not by ``timeout``."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._in_flight, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking writes and fetches, send what is queued (up to ``timeout``; what is left then
        completes unsent, ``done(False)``), close the connections."""
        if self._closed:
            return
        with self._lock:
            self._closed = True
        self._queue.put(None)  # after what is queued (the queue itself is unbounded: never blocks)
        self._writer.join(timeout)
        if self._writer.is_alive():
            log.warning("kvplug remote: writes still queued at close; completed unsent")
            self._abandon_writes = True
            self._writer.join(self._timeout_s + 1.0)  # a batch being sent ends within the socket timeout
        self._reader.shutdown(wait=True, cancel_futures=True)  # a fetch in flight ends within timeout_s
        if self._client is not None:
            _close_quietly(self._client)


def _close_quietly(client) -> None:
    try:
        client.close()
    except Exception:
        pass
