"""The whole store at scale: a TieredStore opening an SSD tier of N blocks.

    python bench/scale.py              # 100k and 1M blocks -> results/scale.json (~3 min)
    python bench/scale.py --quick      # 20k blocks: prints, writes nothing

What the scheduler process holds per stored block once the store is open (the
prefix index, the SSD tier's slot map and the store's own state), how long
opening takes (reading and checking every manifest row, building the maps)
and how long a lookup takes (bench/scale_index.py measures the index alone).

Workload: a manifest of N rows written straight into a real SSD tier
directory (the tier's own Manifest/Row code, valid keys, chains of 64 blocks
of 16 tokens, ids below 2^17) with a tiny block (the bytes are never read:
opening reads only the manifest). Each figure comes from a fresh subprocess:
RSS before ``TieredStore(...)`` and after (gc collected, and after glibc's
malloc_trim: heap the allocator keeps but the store does not use), the
wall and CPU time of the constructor, and the median ``lookup`` time of a
stored 64-block prompt (full hit) and of a novel one (miss). The first lookup
that reaches a block loaded from the manifest also checks that its key is the
hash of its parent and tokens (kvplug/index_check.py): ``lookup_first_hit_us``
is the median of those first lookups (200 distinct prompts, once each),
``lookup_full_hit_us`` the median of 3 more passes over them. Each size runs
twice, in fresh processes: a time is the least of the two, bytes the most; and
side by side, alternating with it, the store of commit ``BASELINE`` (its
kvplug/ from git, first on PYTHONPATH) opens the same manifest: the ratios
old/new are measured under one load.
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
CHAIN, BT, VOCAB = 64, 16, 1 << 17
ROOT = b"r" * 16
BASELINE = "892b71c"  # the store before the start-up and lookup rework (scale_store.json's 10.9 s)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _setup():
    from kvplug.config import KVPlugConfig
    from kvplug.layout import KVLayout
    from kvplug.tiers.slots import slot_stride
    layout = KVLayout(num_layers=1, num_kv_heads=1, head_size=8, block_tokens=BT)
    block = layout.raw_block_bytes()
    return KVPlugConfig, layout, block, slot_stride(block)


def _prompt(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, VOCAB, CHAIN * BT, dtype=np.int64)


def make(path: str, blocks: int) -> None:
    """Write ``blocks`` manifest rows (chains of CHAIN blocks) into a fresh SSD tier at ``path``."""
    import sqlite3
    from kvplug.keys import FORMAT_VERSION, chain_keys
    from kvplug.tiers.manifest import _INSERT, Row
    from kvplug.tiers.ssd import SSDTier
    _, layout, block, stride = _setup()
    tier = SSDTier(path, blocks * stride, block, ROOT, o_direct="off", block_tokens=BT)
    per_seg = tier.slots_per_segment
    tier.close()
    conn = sqlite3.connect(os.path.join(path, "manifest.sqlite3"))
    g = 0
    with conn:
        for c in range(blocks // CHAIN):
            tokens = _prompt(c)
            keys = chain_keys(ROOT, tokens, BT)
            rows = []
            for b, key in enumerate(keys):
                parent = ROOT if b == 0 else keys[b - 1]
                t = tokens[b * BT:(b + 1) * BT].astype("<i8").tobytes()
                rows.append(Row(key, parent, t, g // per_seg, g % per_seg, 0, ROOT, FORMAT_VERSION, g).with_check())
                g += 1
            conn.executemany(_INSERT, rows)
    conn.close()


def child(path: str, blocks: int) -> dict:
    from kvplug.store import TieredStore
    KVPlugConfig, layout, block, stride = _setup()
    queries = [_prompt(c) for c in range(0, blocks // CHAIN, max(1, blocks // CHAIN // 200))][:200]
    novel = [_prompt(10**9 + i) for i in range(50)]
    config = KVPlugConfig(cpu_bytes=64 * stride, shared_memory=False, ssd_path=path,
                          ssd_bytes=blocks * stride, o_direct="off", io_threads=2)
    _trim()
    base = _rss()
    t0, c0 = time.perf_counter(), time.process_time()
    store = TieredStore(config, layout, block, ROOT)
    open_s, open_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    gc.collect()
    rss = _rss() - base
    _trim()
    rss_trimmed = _rss() - base
    stored = store.stats()["ssd"]["blocks"]

    def median_us(prompts, passes: int = 3) -> float:
        times = []
        for _ in range(passes):
            for p in prompts:
                t = time.perf_counter()
                store.lookup(p)
                times.append(time.perf_counter() - t)
        return round(float(np.median(times)) * 1e6, 1)

    first = median_us(queries, passes=1)  # each block's chain checked on the way
    hit = store.lookup(queries[0])
    out = {"blocks": stored, "open_s": round(open_s, 3), "open_cpu_s": round(open_cpu_s, 3),
           "rss_bytes_per_block": round(rss / stored, 1), "rss_trimmed_bytes_per_block": round(rss_trimmed / stored, 1),
           "lookup_first_hit_us": first, "lookup_full_hit_us": median_us(queries), "lookup_miss_us": median_us(novel),
           "full_hit_tokens": hit.num_tokens, "corruptions": store.stats()["ssd"]["corruptions"]}
    store.close()
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(sizes: list[int], write: bool) -> dict:
    load_start = os.getloadavg()
    results, ratios = {}, {}
    with tempfile.TemporaryDirectory() as old:  # the store before this bench's last rework, side by side
        subprocess.run(f"git -C {REPO} archive {BASELINE} kvplug | tar -x -C {old}", shell=True, check=True)
        for n in sizes:
            with tempfile.TemporaryDirectory(dir=os.environ.get("KVPLUG_SCALE_DIR")) as tmp:
                path = os.path.join(tmp, "ssd")
                t = time.perf_counter()
                subprocess.run([sys.executable, __file__, "--make", path, str(n)], check=True)
                made = time.perf_counter() - t
                runs: dict[str, list[dict]] = {"new": [], "old": []}
                for _ in range(2):  # new and old alternate: both see the same load
                    for which, env in (("new", None), ("old", {**os.environ, "PYTHONPATH": old})):
                        out = subprocess.run([sys.executable, __file__, "--child", path, str(n)], check=True,
                                             capture_output=True, text=True, env=env).stdout
                        runs[which].append(json.loads(out.strip().splitlines()[-1]))
                best = {which: {k: (max if "bytes" in k else min)(r[k] for r in rs) for k in rs[0]}
                        for which, rs in runs.items()}
                best["new"]["manifest_made_s"] = round(made, 1)
                results[f"bt{BT}_{n}"] = best
                ratios[f"bt{BT}_{n}"] = {k: round(best["old"][k] / best["new"][k], 2) for k in
                                         ("open_s", "open_cpu_s", "lookup_full_hit_us", "lookup_miss_us",
                                          "rss_bytes_per_block") if best["new"][k]}
                print(n, best, ratios[f"bt{BT}_{n}"], flush=True)
    doc = {
        "what": "whole-store scheduler memory per stored SSD block, open (start-up) time, lookup time",
        "method": __doc__.split("\n\n", 2)[2].strip(),
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_at_start": load_start, "load_avg_at_end": os.getloadavg(),
                    "note": "a cloud VM shared with other jobs: wall times drift with their load"},
        "code": {"head": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                        capture_output=True, text=True).stdout.strip()},
        "baseline": f"old: kvplug/ of commit {BASELINE} (git archive), run from the same manifest",
        "results": results,
        "ratios_old_over_new": ratios,
    }
    big = results.get(f"bt{BT}_1000000", {}).get("new")
    if big:
        doc["targets"] = {"rss_bytes_per_block<=200": big["rss_bytes_per_block"] <= 200,
                          "open_s<=5": big["open_s"] <= 5,
                          "open_cpu_s<=5": big["open_cpu_s"] <= 5,
                          "lookup_64_blocks_us<=100": big["lookup_full_hit_us"] <= 100,
                          "first_lookup_64_blocks_us<=100": big["lookup_first_hit_us"] <= 100}
    if write:
        (HERE / "results" / "scale.json").write_text(json.dumps(doc, indent=1) + "\n")
    return doc


if __name__ == "__main__":
    if sys.argv[1:2] == ["--make"]:
        make(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1:2] == ["--child"]:
        print(json.dumps(child(sys.argv[2], int(sys.argv[3]))))
    elif sys.argv[1:2] == ["--quick"]:
        main([20_000 // CHAIN * CHAIN], write=False)
    else:
        main([100_000 // CHAIN * CHAIN, 1_000_000 // CHAIN * CHAIN], write=True)
