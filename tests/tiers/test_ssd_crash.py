"""kill -9 at random points: after every restart each lookup is exact bytes or a miss.

A child process hammers an SSD tier (writes, reads, deletes, evictions) with
blocks whose bytes derive from their keys, reporting each write the tier
acknowledged; the parent SIGKILLs it at a random moment, reopens the
directory and checks every block it could have stored.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np

from kvplug.keys import block_key
from kvplug.tiers.ssd import SSDTier
from ssd_helpers import BLOCK, FP, block, content, slot

CHILD = textwrap.dedent("""
    import os, random, sys
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    from kvplug.tiers.ssd import SSDTier
    from ssd_helpers import BLOCK, FP, block, content, slot

    path, seed, capacity, universe, p_delete = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
    rng = random.Random(seed)
    tier = SSDTier(path, capacity, BLOCK, FP, io_threads=4)
    print("ready", flush=True)

    def acked(key):  # os.write: one atomic line from any I/O thread
        return lambda f: f.result() and os.write(1, f"acked {key.hex()}\\n".encode())

    inflight = []
    while True:
        key, parent, tokens = block(rng.randrange(universe))
        r = rng.random()
        if r < p_delete:
            tier.delete(key)
        elif r < 0.3:
            out = slot()
            if tier.read(key, out).result() and not np.array_equal(out[:BLOCK], content(key)):
                print("WRONG", key.hex(), flush=True)
                sys.exit(3)
        else:
            buf = slot(fill=content(key))
            fut = tier.write(key, parent, tokens, buf)
            fut.add_done_callback(acked(key))
            inflight.append((fut, buf))  # the buffer must outlive the write
            if len(inflight) > 8:
                inflight.pop(0)[0].result()
""")


def run_and_kill(path: str, seed: int, capacity: int, universe: int, p_delete: float) -> set[bytes]:
    """Start the child, kill -9 it at a random moment; the keys it saw acknowledged."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, os.path.dirname(__file__), path, str(seed), str(capacity),
         str(universe), str(p_delete)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def pump():
        for line in child.stdout:
            lines.append(line.split())
            ready.set()
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    assert ready.wait(30), child.stderr.read()
    time.sleep(random.Random(seed).uniform(0.0, 0.4))
    child.send_signal(signal.SIGKILL)
    child.wait()
    reader.join(10)
    assert ["WRONG"] not in [ln[:1] for ln in lines], lines
    assert child.returncode == -signal.SIGKILL, child.stderr.read()
    return {bytes.fromhex(ln[1]) for ln in lines if ln[0] == "acked"}


def check(path: str, capacity: int, universe: int) -> set[bytes]:
    """Every block reads back exactly or misses; the manifest lists only true blocks."""
    present = set()
    with SSDTier(path, capacity, BLOCK, FP) as tier:
        for key, parent, tokens in tier.entries():
            assert key == block_key(parent, tokens) and parent == FP
        for i in range(universe):
            key = block(i)[0]
            out = slot()
            if tier.read(key, out).result():
                assert np.array_equal(out[:BLOCK], content(key)), f"wrong bytes for block {i}"
                present.add(key)
        stats = tier.stats()
        # A kill never leaves a row pointing at a torn or reused slot.
        assert stats["corruptions"] == 0 and stats["io_faults"] == 0, stats
        assert stats["blocks"] <= stats["capacity_blocks"]
    return present


def test_kill9_with_eviction_and_deletes(tmp_path):
    """Small capacity: slots are evicted and reused constantly while being killed."""
    path, capacity, universe = str(tmp_path), 24 * 12288, 64
    for seed in range(22):
        run_and_kill(path, seed, capacity, universe, p_delete=0.1)
        check(path, capacity, universe)


def test_kill9_keeps_acknowledged_writes(tmp_path):
    """Room for everything: every write acknowledged before the kill survives it."""
    path, capacity, universe = str(tmp_path), 512 * 12288, 400
    for seed in range(100, 104):
        acked = run_and_kill(path, seed, capacity, universe, p_delete=0.0)
        present = check(path, capacity, universe)
        assert acked <= present, f"{len(acked - present)} acknowledged blocks lost"
