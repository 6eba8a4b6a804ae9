"""``remote_url``: where the remote tier's server (or cluster) is, parsed and checked.

    redis://host:port[/db]                 one server
    rediss://host:port[/db]                one server over TLS
    redis://h1:p1,h2:p2,h3:p3              a cluster, given by seed nodes (rediss:// for TLS)

Credentials never go in the URL (it is logged and shown in errors): they come
from ``remote_username`` and ``remote_password`` (an environment variable or
a file). No redis import here: config validation runs without the client.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_HOST = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]{1,253})$")
ACCEPTED = ("redis://host:port[/db], rediss://host:port[/db] (TLS), or several seed nodes of a cluster "
            "(redis://h1:p1,h2:p2); no user or password in the URL (use remote_username / remote_password)")


@dataclass(frozen=True)
class RemoteURL:
    tls: bool
    nodes: tuple[tuple[str, int], ...]
    db: int

    def __str__(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://" + ",".join(f"{h}:{p}" for h, p in self.nodes) + (f"/{self.db}" if self.db else "")


def parse(url: str) -> RemoteURL:
    """A ``RemoteURL``, or ValueError saying what is wrong (never echoing credentials)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("redis", "rediss"):
        raise ValueError("the scheme must be redis:// or rediss://")
    hosts, _, path = rest.partition("/")
    if "@" in hosts:
        raise ValueError("credentials in the URL")
    if "?" in rest or "#" in rest:
        raise ValueError("query or fragment in the URL")
    db = 0
    if path:
        if not path.isdigit() or int(path) > 1 << 16:
            raise ValueError("the database must be a number")
        db = int(path)
    nodes = []
    for node in hosts.split(","):
        host, colon, port = node.rpartition(":")
        if not colon:
            host, port = node, "6379"
        if not _HOST.match(host) or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"not host:port: {node[:80]!r}")
        nodes.append((host.strip("[]"), int(port)))
    if len(nodes) > 1 and db:
        raise ValueError("a cluster has database 0 only")
    return RemoteURL(scheme.lower() == "rediss", tuple(nodes), db)
