"""One pipeline per server node, so that a dead cluster node costs only its own keys.

redis-py's cluster pipeline fails as a whole when any node it needs is
unreachable. The remote tier instead groups its keys by the node that owns
their slot (the cluster client's slot map) and runs one pipeline per node: a
node that fails (refused, timed out) turns only its keys into misses, and is
left alone for ``retry_s`` so that later requests do not wait on it again.
Only when every node failed is the error raised (the whole link is down).
A single server is one group: its failure is the link's.

Slots move (resharding, failover), and the per-node pipelines do not follow
redirections by themselves, so ``run`` does: keys answered ``MOVED`` or
``ASK`` are asked once more at the node the reply names (``ASKING`` first for
an ``ASK``), keys answered ``CLUSTERDOWN`` / ``TRYAGAIN`` once more at their
slot's owner. A ``MOVED``, ``CLUSTERDOWN`` or a failed node also re-reads the
slot map (at most once per ``REFRESH_MIN_S``: a storm of redirections costs
one refresh), so that later requests go to the right node at once.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from typing import Callable

REFRESH_MIN_S = 1.0  # shortest time between two slot-map reads (each asks a node for CLUSTER SLOTS)
BUFFER_CUTOFF = 6000  # redis-py's default: a larger argument goes to the socket as its own buffer


def lean(conn) -> None:
    """Send large values as they are. With hiredis installed redis-py packs every command with
    hiredis, which copies a memoryview to bytes and then the whole command into one buffer: two
    copies of each multi-MiB record (a third of the write time, bench/remote.py). redis-py's own
    packer hands a memoryview to the socket untouched. Set on the node's pool before its
    connections are used; connections made earlier (the slot-map read) are dropped once."""
    pool = conn.connection_pool
    if "command_packer" in pool.connection_kwargs:
        return
    from redis.connection import Encoder, PythonRespSerializer

    pool.connection_kwargs["command_packer"] = PythonRespSerializer(BUFFER_CUTOFF,
                                                                    Encoder("utf-8", "strict", False).encode)
    pool.reset()


class NodeDown(Exception):
    """This key's node failed recently (or no node serves its slot): not asked (a miss)."""


def _redirections():
    from redis.exceptions import AskError, ClusterDownError, MovedError, TryAgainError

    return AskError, MovedError, (AskError, ClusterDownError, TryAgainError)


class NodePipelines:
    def __init__(self, cluster: bool, retry_s: float):
        self.cluster, self.retry_s = cluster, retry_s
        self._down: dict[str, float] = {}  # node name -> when it may be asked again
        self._refreshed_at = float("-inf")
        self._lock = threading.Lock()

    def run(self, client, names: list[bytes], add: Callable[[object, int], None]) -> tuple[list, Counter]:
        """Replies (or exceptions) per name in order, and counts (node_errors, redirects,
        slot_map_refreshes). ``add(pipe, i)`` queues name i's command. Raises when every node asked failed."""
        replies: list = [None] * len(names)
        counts: Counter = Counter()
        groups = self._groups(client, names, range(len(names)), replies)
        failed, error = self._send(groups, replies, add)
        if groups and failed == len(groups):
            raise error or NodeDown("every node is left alone for now")
        counts["node_errors"] = failed
        if self.cluster:
            ask, moved, redirected = _redirections()
            again = [i for i, r in enumerate(replies) if isinstance(r, redirected)]
            if failed or any(not isinstance(replies[i], ask) or isinstance(replies[i], moved) for i in again):
                counts["slot_map_refreshes"] = self._refresh(client)  # the map is stale
            if again:
                counts["redirects"] = len(again)
                retry_failed, _ = self._send(self._redirected(client, names, again, replies), replies, add)
                counts["node_errors"] += retry_failed
        return replies, counts

    def _send(self, groups, replies: list, add) -> tuple[int, Exception | None]:
        """One pipeline per group; (groups that failed, the last error)."""
        failed, last_error, now = 0, None, time.monotonic()
        for node, conn, idxs, asking in groups:
            with self._lock:
                skip = self._down.get(node, 0.0) > now
            if skip:
                for i in idxs:
                    replies[i] = NodeDown(node)
                failed += 1
                continue
            try:
                lean(conn)
                pipe = conn.pipeline(transaction=False)
                for i in idxs:
                    if asking:
                        pipe.execute_command("ASKING")  # the next command only: the slot is being imported here
                    add(pipe, i)
                out = pipe.execute(raise_on_error=False)
                for i, reply in zip(idxs, out[1::2] if asking else out):
                    replies[i] = reply
            except Exception as e:  # this node only
                failed, last_error = failed + 1, e
                with self._lock:
                    self._down[node] = time.monotonic() + self.retry_s
                for i in idxs:
                    replies[i] = e
        return failed, last_error

    def _refresh(self, client) -> int:
        """Read the slot map again, unless it was read less than REFRESH_MIN_S ago; 1 if read."""
        with self._lock:
            now = time.monotonic()
            if now - self._refreshed_at < REFRESH_MIN_S:
                return 0
            self._refreshed_at = now
        try:
            client.nodes_manager.initialize()
            return 1
        except Exception:  # every seed down: the next refresh tries again
            return 0

    def _groups(self, client, names: list[bytes], idxs, replies: list) -> list:
        """(node name, connection, indices, asking) per node owning some of ``idxs``."""
        if not self.cluster:
            return [("server", client, list(idxs), False)] if names else []
        groups: dict[str, tuple[object, list[int]]] = {}
        for i in idxs:
            try:
                node = client.get_node_from_key(names[i])
            except Exception as e:  # no node serves its slot (it died, no replica took over): a miss
                replies[i] = NodeDown(str(e))
                continue
            if node.name not in groups:
                groups[node.name] = (client.get_redis_connection(node), [])
            groups[node.name][1].append(i)
        return [(name, conn, idxs, False) for name, (conn, idxs) in groups.items()]

    def _redirected(self, client, names: list[bytes], again: list[int], replies: list) -> list:
        """Groups for one more try: the node a MOVED / ASK names, else the slot's owner now."""
        ask, moved, _ = _redirections()
        by_target: dict[tuple[str, bool], list[int]] = defaultdict(list)
        owner = []
        for i in again:
            r = replies[i]
            if isinstance(r, ask):
                by_target[(f"{r.host}:{r.port}", not isinstance(r, moved))].append(i)
            else:
                owner.append(i)
        groups = []
        for (name, asking), idxs in by_target.items():
            host, _, port = name.rpartition(":")
            node = client.get_node(host=host, port=int(port))
            if node is None:  # a node the map does not know yet (refreshed at most once a second)
                for i in idxs:
                    replies[i] = NodeDown(name)
                continue
            groups.append((node.name, client.get_redis_connection(node), idxs, asking))
        return groups + (self._groups(client, names, owner, replies) if owner else [])


def by_bytes(records: list, limit: int):
    """(lo, hi) ranges of ``records`` in order, each under ``limit`` bytes or a single record."""
    lo, size = 0, 0
    for i, rec in enumerate(records):
        if i > lo and size + len(rec) > limit:
            yield lo, i
            lo, size = i, 0
        size += len(rec)
    if lo < len(records):
        yield lo, len(records)
