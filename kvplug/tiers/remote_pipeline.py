"""One pipeline per server node, so that a dead cluster node costs only its own keys.

redis-py's cluster pipeline fails as a whole when any node it needs is
unreachable. The remote tier instead groups its keys by the node that owns
their slot (the cluster client's slot map) and runs one pipeline per node: a
node that fails (refused, timed out) turns only its keys into misses, and is
left alone for ``retry_s`` so that later requests do not wait on it again;
the slot map is read again once, in case a replica has taken its slots over.
Only when every node failed is the error raised (the whole link is down).
A single server is one group: its failure is the link's.
"""

from __future__ import annotations

import threading
import time
from typing import Callable


class NodeDown(Exception):
    """This key's node failed recently: not asked (a miss)."""


class NodePipelines:
    def __init__(self, cluster: bool, retry_s: float):
        self.cluster, self.retry_s = cluster, retry_s
        self._down: dict[str, float] = {}  # node name -> when it may be asked again
        self._lock = threading.Lock()

    def run(self, client, names: list[bytes], add: Callable[[object, int], None]) -> tuple[list, int]:
        """Replies (or exceptions) per name in order, and how many nodes failed. ``add(pipe, i)``
        queues name i's command. Raises when every node asked failed."""
        replies: list = [None] * len(names)
        failed, last_error, now = 0, None, time.monotonic()
        groups = self._groups(client, names)
        for node, conn, idxs in groups:
            with self._lock:
                skip = self._down.get(node, 0.0) > now
            if skip:
                for i in idxs:
                    replies[i] = NodeDown(node)
                failed += 1
                continue
            try:
                pipe = conn.pipeline(transaction=False)
                for i in idxs:
                    add(pipe, i)
                for i, reply in zip(idxs, pipe.execute(raise_on_error=False)):
                    replies[i] = reply
            except Exception as e:  # this node only
                failed, last_error = failed + 1, e
                with self._lock:
                    self._down[node] = time.monotonic() + self.retry_s
                for i in idxs:
                    replies[i] = e
        if groups and failed == len(groups):
            raise last_error or NodeDown("every node is left alone for now")
        if last_error is not None and self.cluster:
            try:
                client.nodes_manager.initialize()  # a replica may own the dead node's slots now
            except Exception:
                pass
        return replies, failed

    def _groups(self, client, names: list[bytes]) -> list[tuple[str, object, list[int]]]:
        if not self.cluster:
            return [("server", client, list(range(len(names))))] if names else []
        groups: dict[str, tuple[object, list[int]]] = {}
        for i, name in enumerate(names):
            node = client.get_node_from_key(name)
            if node.name not in groups:
                groups[node.name] = (client.get_redis_connection(node), [])
            groups[node.name][1].append(i)
        return [(name, conn, idxs) for name, (conn, idxs) in groups.items()]
