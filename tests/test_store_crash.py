"""kill -9 of a whole store (CPU slab in shared memory + SSD tier) at random moments.

A child process stores and loads blocks whose bytes derive from their tokens;
the parent SIGKILLs it at a random moment, then opens a new store on the same
shm_dir and ssd_path. The dead store's slab must be gone from shm_dir (swept
at start: nothing outlives the next start), and every block the new store
finds must hold exactly its bytes.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np

from kvplug.config import KVPlugConfig
from kvplug.keys import tokens_array
from kvplug.layout import KVLayout
from kvplug.store import TieredStore

LAYOUT = KVLayout(2, 2, 8, 4, "bfloat16")
BLOCK = LAYOUT.raw_block_bytes()
UNIVERSE = 48

CHILD = textwrap.dedent(f"""
    import random, sys
    import numpy as np
    from kvplug.config import KVPlugConfig
    from kvplug.layout import KVLayout
    from kvplug.store import TieredStore
    sys.path.insert(0, sys.argv[1])
    from test_store_crash import LAYOUT, BLOCK, UNIVERSE, config, tokens_of, bytes_of

    store = TieredStore(config(sys.argv[2], sys.argv[3]), LAYOUT, BLOCK, b"f" * 16)
    rng = random.Random(int(sys.argv[4]))
    print("ready", flush=True)
    while True:
        i = rng.randrange(UNIVERSE)
        if rng.random() < 0.6:
            store.put(store.root, tokens_of(i), bytes_of(i))
        else:
            n, blocks = store.get(tokens_of(i))
            if n and blocks[0] != bytes_of(i).tobytes():
                print("WRONG", flush=True)
                sys.exit(3)
""")


def config(shm_dir: str, ssd_path: str) -> KVPlugConfig:
    return KVPlugConfig(cpu_bytes=8 * 8192, shm_dir=shm_dir, ssd_path=ssd_path, ssd_bytes=32 * 8192 * 2,
                        ssd_write="through", io_threads=2)


def tokens_of(i: int) -> list[int]:
    return [i, i + 1, i + 2, i + 3]


def bytes_of(i: int) -> np.ndarray:
    return np.random.RandomState(i).randint(0, 256, BLOCK).astype(np.uint8)


def slabs(shm_dir) -> set[str]:
    return {n for n in os.listdir(shm_dir) if n.startswith("kvplug-")}


def test_kill9_leaves_no_slab_and_no_wrong_block(tmp_path):
    shm, ssd = tmp_path / "shm", str(tmp_path / "ssd")
    shm.mkdir()
    for seed in range(8):
        child = subprocess.Popen([sys.executable, "-c", CHILD, os.path.dirname(__file__), str(shm), ssd, str(seed)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        time.sleep(random.Random(seed).uniform(0.0, 0.3))
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert child.returncode == -signal.SIGKILL, child.stderr.read()
        assert "WRONG" not in child.stdout.read()
        left = slabs(shm)
        assert len(left) == 1  # the dead store's slab is still there...
        store = TieredStore(config(str(shm), ssd), LAYOUT, BLOCK, b"f" * 16)
        try:
            assert slabs(shm) == {store.cpu.name}, left  # ...until the next start sweeps it
            for i in range(UNIVERSE):
                n, blocks = store.get(tokens_array(tokens_of(i)))
                if n:
                    assert blocks[0] == bytes_of(i).tobytes(), f"wrong bytes for block {i} after kill {seed}"
        finally:
            store.close()
