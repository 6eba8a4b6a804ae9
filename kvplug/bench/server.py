"""A server process for the bench: started in its own session, watched, stopped.

``Server`` starts a command (``kvplug serve ...`` or ``lmcache server ...``)
with its output in a log file, waits until it answers (an HTTP URL or a TCP
port), samples the RSS and CPU seconds of its whole process tree (the API
server, EngineCore and its workers) every ``sample_s`` and stops it with
SIGTERM to its process group (SIGKILL after a grace period). RSS counts a
shared-memory slab in every process that maps it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kvplug_command() -> list[str]:
    """``kvplug`` as this Python runs it (the console script may not be on PATH)."""
    return [sys.executable, "-m", "kvplug.cli"]


class ServerFailed(RuntimeError):
    pass


class Server:
    def __init__(self, name: str, cmd: list[str], log_path: Path, env: dict, sample_s: float = 0.5):
        self.name, self.cmd, self.log_path = name, cmd, log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                     start_new_session=True)
        self.peak_rss = 0
        self._cpu: dict[int, float] = {}  # pid -> its latest user + system seconds (the last sample of one gone)
        self._stop = threading.Event()
        self._sample_s = sample_s
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def log_tail(self, n: int = 4000) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def _alive_or_raise(self) -> None:
        if self.proc.poll() is not None:
            raise ServerFailed(f"{self.name} exited ({self.proc.returncode}); log {self.log_path}:\n{self.log_tail()}")

    def wait_http(self, url: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self._alive_or_raise()
            try:
                urllib.request.urlopen(url, timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise ServerFailed(f"{self.name} did not answer {url} within {timeout:.0f} s; log {self.log_path}:\n"
                           f"{self.log_tail()}")

    def wait_port(self, port: int, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self._alive_or_raise()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.5)
        raise ServerFailed(f"{self.name} did not open port {port} within {timeout:.0f} s; log {self.log_path}")

    @property
    def cpu_s(self) -> float:
        """CPU seconds of the process tree, as of the last sample."""
        return round(sum(self._cpu.values()), 2)

    def tree_rss(self) -> int:
        """RSS of the process tree now (and each process's CPU seconds noted)."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for p in procs:
            try:
                with p.oneshot():
                    total += p.memory_info().rss
                    t = p.cpu_times()
                    self._cpu[p.pid] = t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def _sample(self) -> None:
        while not self._stop.wait(self._sample_s):
            self.peak_rss = max(self.peak_rss, self.tree_rss())

    def stop(self, grace_s: float = 60) -> int | None:
        self._stop.set()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        try:  # what is left of the group (a worker the server did not take down with it)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()
        return self.proc.returncode
