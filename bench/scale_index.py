"""PrefixIndex at scale: memory per stored block, insert (start-up) time, match time.

    python bench/scale_index.py      # 100k and 1M blocks, 16 and 128 tokens a block -> results/scale_index.json (~3 min)
    python bench/scale_index.py --quick # 10k blocks: a smoke run, prints, writes nothing

Each figure comes from a fresh subprocess per (index, block_tokens, blocks), for
the current index (kvplug/index.py) and, side by side in the same run, the one
before the compact rewrite (``git show 1427e91:kvplug/index.py``, imported from
a temp file), so the ratio is measured on one machine under one load.

Workload: chains of 64 full blocks (a 64-block prompt each, the common case),
token ids drawn uniformly below 2^17 (a 128k vocabulary), every chain under
one root, as the store builds them; keys from ``keys.chain_keys``.

- bytes/block: RSS delta of the subprocess from just before the index is made
  to after the last insert (gc collected), over the blocks stored. The
  workload is made in batches of 4,096 blocks; one batch is made and dropped
  before the baseline so the allocator's pools for it are already counted.
  ``rss_trimmed``: the same after glibc's malloc_trim(0), i.e. without the
  free heap the allocator keeps (reusable by the process, but not the
  index's); ``arrays``: the new index's own count of its arrays' bytes.
- insert: the time of the insert loops only (as the store's start-up does it:
  ``for key, parent, tokens in ssd.entries(): index.insert(key, parent, tokens)``),
  gc enabled as in the store; start-up = that time for all blocks.
- match: median over 600 calls (3 passes over 200 stored prompts) of
  ``match(prompt)`` for a stored 64-block prompt (a full hit), for one that
  leaves the stored chain half way into block 33 (32 full blocks + a partial
  hit), and for a novel prompt (a miss: the root's thousands of children are
  scanned).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OLD_COMMIT = "1427e91"
ROOT_KEY = b"s" * 16
CHAIN = 64
BATCH_CHAINS = 64
VOCAB = 1 << 17
PROMPTS = 200
PASSES = 5


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim() -> None:
    """Have glibc give free heap pages back, so that RSS counts what is held, not what
    the allocator keeps after the growth transients (tables rebuilt, arrays doubled)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _chain(seed: int, i: int, bt: int) -> np.ndarray:
    return np.random.default_rng((seed, i)).integers(0, VOCAB, CHAIN * bt, dtype=np.int64)


def _old_chain_keys(root: bytes, tokens: np.ndarray, bt: int) -> list[bytes]:
    """Keys as the old index hashes them (xxh3-128; kvplug's keys are SHA-256 based since)."""
    import xxhash

    raw, step, keys, parent = tokens.tobytes(), bt * 8, [], root
    for i in range(len(tokens) // bt):
        parent = xxhash.xxh3_128_digest(parent + raw[i * step:(i + 1) * step])
        keys.append(parent)
    return keys


def _batch(seed: int, first: int, count: int, bt: int, which: str = "new") -> list[tuple[bytes, bytes, np.ndarray]]:
    from kvplug.keys import chain_keys

    chain = chain_keys if which == "new" else _old_chain_keys
    out = []
    for c in range(first, first + count):
        tokens = _chain(seed, c, bt)
        parent = ROOT_KEY
        for j, key in enumerate(chain(ROOT_KEY, tokens, bt)):
            out.append((key, parent, tokens[j * bt:(j + 1) * bt].copy()))  # own array, as ssd.entries() yields
            parent = key
    return out


def _load_index(which: str):
    if which == "new":
        from kvplug.index import PrefixIndex
        return PrefixIndex
    src = subprocess.run(["git", "show", f"{OLD_COMMIT}:kvplug/index.py"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.replace("from .keys import", "from kvplug.keys import")
    with tempfile.NamedTemporaryFile("w", suffix="_old_index.py", delete=False) as f:
        f.write(src)
    namespace = {"__name__": "old_index"}
    exec(compile(src, f.name, "exec"), namespace)
    os.unlink(f.name)
    return namespace["PrefixIndex"]


def _match_us(fn, queries) -> tuple[float, float]:
    """(median wall time of a call, best over passes of the mean CPU time of a call), µs."""
    wall, cpu = [], []
    for _ in range(PASSES):
        c0 = time.process_time()
        for q in queries:
            t0 = time.perf_counter()
            fn(q)
            wall.append(time.perf_counter() - t0)
        cpu.append((time.process_time() - c0) / len(queries))
    return round(float(np.median(wall)) * 1e6, 2), round(min(cpu) * 1e6, 2)


def child(which: str, bt: int, blocks: int, seed: int = 0) -> dict:
    index_cls = _load_index(which)
    chains = blocks // CHAIN
    _batch(seed + 1, 0, BATCH_CHAINS, bt, which)  # warm the allocator's pools for a batch
    gc.collect()
    rss0 = _rss()
    index = index_cls(ROOT_KEY, bt)
    insert_s = insert_cpu_s = 0.0
    for first in range(0, chains, BATCH_CHAINS):
        batch = _batch(seed, first, min(BATCH_CHAINS, chains - first), bt, which)
        insert = index.insert
        t0, c0 = time.perf_counter(), time.process_time()
        for key, parent, tokens in batch:
            insert(key, parent, tokens)
        insert_s += time.perf_counter() - t0
        insert_cpu_s += time.process_time() - c0
        del batch
    gc.collect()
    rss = _rss() - rss0
    _malloc_trim()
    rss_trimmed = _rss() - rss0
    assert len(index) == chains * CHAIN, len(index)

    rng = np.random.default_rng(seed + 2)
    picks = rng.choice(chains, size=min(PROMPTS, chains), replace=False)
    full = [_chain(seed, int(c), bt) for c in picks]
    half = []
    for q in full:
        q = q.copy()
        cut = 32 * bt + bt // 2
        q[cut:] = (q[cut:] + 1) % VOCAB  # leaves the chain half way into block 33
        half.append(q)
    novel = [rng.integers(0, VOCAB, CHAIN * bt, dtype=np.int64) for _ in range(len(full))]
    assert sum(n for _, n in index.match(full[0])) == CHAIN * bt
    assert sum(n for _, n in index.match(half[0])) == 32 * bt + bt // 2
    out = {
        "blocks": len(index),
        "rss_bytes_per_block": round(rss / len(index), 1),
        "rss_trimmed_bytes_per_block": round(rss_trimmed / len(index), 1),
        "insert_us_per_block": round(insert_s / len(index) * 1e6, 3),
        "insert_cpu_us_per_block": round(insert_cpu_s / len(index) * 1e6, 3),
        "startup_s": round(insert_s, 3),
        "startup_cpu_s": round(insert_cpu_s, 3),
    }
    for name, queries in (("full_hit", full), ("half_hit", half), ("miss", novel)):
        out[f"match_{name}_us"], out[f"match_{name}_cpu_us"] = _match_us(index.match, queries)
    if hasattr(index, "nbytes"):
        out["arrays_bytes_per_block"] = round(index.nbytes() / len(index), 1)
        out["token_dtype"] = str(index.token_dtype)
    return out


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return {
        "cpu": cpu, "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
        "kernel": platform.release(), "python": platform.python_version(), "numpy": np.__version__,
        "load_avg_at_start": os.getloadavg()[0],
        "note": "a cloud VM on a shared host, other jobs running: times drift between runs; memory does not",
    }


def _run_child(which: str, bt: int, blocks: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", which, str(bt), str(blocks)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode:
        raise RuntimeError(f"{which} bt={bt} blocks={blocks}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summary(runs: list[dict]) -> dict:
    """Over repeated runs: the least time (load only ever adds), the most memory."""
    out = {}
    for k, v in runs[0].items():
        vals = [r[k] for r in runs]
        out[k] = (max(vals) if k.startswith("rss") else min(vals)) if isinstance(v, float) else v
    return out


def main(sizes: list[int], repeats: int, write: bool) -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    doc = {"machine": machine(),
           "code": {"head": git("rev-parse", "--short", "HEAD"), "old": OLD_COMMIT,
                    "index_py_blob": git("hash-object", "kvplug/index.py"),  # == `git ls-tree <commit> kvplug/index.py`
                    "index_py_modified": bool(git("status", "--porcelain", "kvplug/index.py"))},
           "method": __doc__.split("\n\n", 2)[2].strip() + (
               f" Each (index, block_tokens, blocks) ran {repeats} times, old and new alternating; a time is the"
               " least over those runs, bytes/block the most. *_cpu_* figures are process CPU time (user + system),"
               " less sensitive to other jobs than wall time."),
           "results": {}, "ratios_old_over_new": {}, "targets": {}}
    for bt in (16, 128):
        for blocks in sizes:
            runs = {"old": [], "new": []}
            for _ in range(repeats):
                for which in ("old", "new"):
                    runs[which].append(_run_child(which, bt, blocks))
                    print(f"bt={bt:4d} blocks={blocks:8d} {which}: {runs[which][-1]}", flush=True)
            row = {which: _summary(r) for which, r in runs.items()}
            name = f"bt{bt}_{blocks}"
            doc["results"][name] = row
            doc["ratios_old_over_new"][name] = {
                k: round(row["old"][k] / row["new"][k], 2) for k in row["new"]
                if k in row["old"] and isinstance(row["new"][k], float) and row["new"][k]}
    new16 = doc["results"].get(f"bt16_{max(sizes)}", {}).get("new")
    if new16:
        doc["targets"] = {
            "blocks": max(sizes),
            "rss_bytes_per_block_16_tokens<=200": new16["rss_bytes_per_block"] <= 200,
            "startup_s_16_tokens<=5": new16["startup_s"] <= 5,
            "startup_cpu_s_16_tokens<=5": new16["startup_cpu_s"] <= 5,
            "match_64_block_prompt_us<=100": new16["match_full_hit_us"] <= 100,
        }
    doc["machine"]["load_avg_at_end"] = os.getloadavg()[0]
    if write:
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "scale_index.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        which, bt, blocks = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        print(json.dumps(child(which, bt, blocks)))
    elif sys.argv[1:2] == ["--quick"]:
        main([10_000], repeats=1, write=False)
    else:
        main([100_000, 1_000_000], repeats=2, write=True)
