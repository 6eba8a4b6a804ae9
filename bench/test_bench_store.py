"""Store throughput beside what it is built on, measured in the same run.

CPU tier: blocks into / out of CPU slots through TieredStore's two-phase API
(prepare_store -> copy into the slots -> complete_store; lookup ->
prepare_load -> copy out of the slots -> complete_load, one 32-block request
per call, as a connector does), beside a plain torch copy of the same bytes
between the same buffers.

SSD tier: SSDTier.write / read of CPU slots, beside raw sequential I/O of the
same bytes on the same filesystem with the same number of threads: O_DIRECT
where supported (then reads come from the device), else buffered with the
page cache dropped (posix_fadvise DONTNEED) before every read round.

Each baseline round runs in pytest-benchmark's setup hook right before the
subject's round: interleaved, so both see the same machine. The garbage
collector is off during rounds, as timeit does. Writes bench/results/store.json
(or $KVPLUG_STORE_BENCH_JSON).

    pytest bench/test_bench_store.py --benchmark-enable
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import pytest
import torch

from kvplug.config import KVPlugConfig
from kvplug.keys import fingerprint
from kvplug.layout import KVLayout
from kvplug.store import StoreEntry, TieredStore
from kvplug.tiers.cpu import CPUTier
from kvplug.tiers.ssd import SSDTier

LAYOUTS = {  # layers, KV heads, head size, tokens per block; bf16, K and V
    "real_2MiB": KVLayout(32, 8, 128, 16),    # a Llama-3-8B-like block
    "small_256KiB": KVLayout(4, 2, 64, 128),  # a small model, long blocks
}
ROUND_BYTES = 256 << 20
ROUNDS = 31
REQUEST_BLOCKS = 32
IO_THREADS = 4
RESULTS = Path(os.environ.get("KVPLUG_STORE_BENCH_JSON", Path(__file__).parent / "results" / "store.json"))
_results: dict[str, dict] = {}
HEADLINE = "real_2MiB"
_ssd_dirs: list[Path] = []
_noise: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    yield
    measured = sum(k.endswith("_ratio") for entry in _results.values() for k in entry)
    if measured < 4 * len(LAYOUTS):  # a partial run (-k ...) must not overwrite a full one
        print(f"\nstore bench: partial run, {RESULTS} left as it was:\n{json.dumps(_results, indent=1)}")
        return
    RESULTS.parent.mkdir(exist_ok=True)
    doc = {"machine": _machine(), "method": {
        "round_bytes": ROUND_BYTES, "rounds": ROUNDS,
        "statistic": "GB/s: median round; *_ratio: median over rounds of the paired ratio (each subject round "
                     "against the baseline round timed just before it)",
        "io_threads": IO_THREADS, "request_blocks": REQUEST_BLOCKS,
        "gc": "disabled during timed rounds (baseline and subject alike)",
        "torch_threads": 1,
        "raw_baseline": "os.pwritev / os.preadv of block_bytes per block at sequential offsets, "
                        f"{IO_THREADS} threads, all blocks of a round queued at once",
        "ssd_steady_state": "tier capacity 2 rounds; every write round evicts the oldest blocks",
    }}
    # The headline keys are the real-model block's (what a 32-layer model moves);
    # the worst ratio over every block size is kept beside them.
    head = _results[HEADLINE]
    doc["headline_block"] = HEADLINE
    doc.update({k: head[k] for k in head if k.endswith(("_gbps", "_ratio"))})
    doc["worst_ratios"] = {r: min(e[r] for e in _results.values())
                           for r in ("cpu_get_ratio", "cpu_put_ratio", "ssd_read_ratio", "ssd_write_ratio")}
    doc["block_sizes"] = _results
    if _noise:
        doc["noise_floor"] = _noise
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")


@pytest.fixture(autouse=True)
def _quiet():
    """No garbage collection inside rounds, and single-threaded torch copies:
    OpenMP's spinning threads made copies erratic on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.collect()
    gc.disable()
    yield
    gc.enable()
    torch.set_num_threads(threads)


def _record(size: str, **values) -> None:
    entry = _results.setdefault(size, {"block_bytes": LAYOUTS[size].raw_block_bytes(),
                                       "blocks_per_round": _blocks(size)})
    entry.update({k: round(v, 4) if isinstance(v, float) else v for k, v in values.items()})
    for num, den, ratio in (("cpu_get_gbps", "memcpy_gbps", "cpu_get_ratio"),
                            ("cpu_put_gbps", "memcpy_put_gbps", "cpu_put_ratio"),
                            ("ssd_read_gbps", "raw_read_gbps", "ssd_read_ratio"),
                            ("ssd_write_gbps", "raw_write_gbps", "ssd_write_ratio")):
        if ratio in values:
            entry[ratio] = round(values[ratio], 3)
        elif num in entry and den in entry:
            entry[ratio] = round(entry[num] / entry[den], 3)


def _blocks(size: str) -> int:
    return ROUND_BYTES // LAYOUTS[size].raw_block_bytes()


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


class Interleaved:
    """Times a baseline round in the setup hook, just before each subject round."""

    def __init__(self, baseline, prepare=lambda: None):
        self.baseline, self.prepare, self.times = baseline, prepare, []

    def __call__(self):
        t = time.perf_counter()
        self.baseline()
        self.times.append(time.perf_counter() - t)
        self.prepare()

    def run(self, benchmark, subject, nbytes: int) -> tuple[float, float, float] | None:
        """(subject GB/s, baseline GB/s) from median rounds, and the median of the paired
        ratios (each subject round over the baseline round run just before it: the
        machine's drift between rounds cancels); None when benchmarks are disabled."""
        benchmark.pedantic(subject, setup=self, rounds=ROUNDS, warmup_rounds=1)
        if benchmark.disabled:
            return None
        subject_times = benchmark.stats.stats.data
        self.times = self.times[-len(subject_times):]  # drop the warm-up round's
        paired = statistics.median(b / s for b, s in zip(self.times, subject_times))
        return (_gbps(nbytes, benchmark.stats.stats.median), _gbps(nbytes, statistics.median(self.times)), paired)


# -- CPU tier -------------------------------------------------------------------

def _store(size: str):
    layout = LAYOUTS[size]
    bb = layout.raw_block_bytes()
    config = KVPlugConfig(cpu_bytes=3 * ROUND_BYTES + 3 * (bb + 8192), shared_memory=False)
    return TieredStore(config, layout, bb, fingerprint("bench", {"size": size}, "raw")), layout, bb


class Requests:
    """Fresh token chains cut into REQUEST_BLOCKS-block requests: every round stores new blocks."""

    def __init__(self, store: TieredStore, layout: KVLayout, n: int):
        self.store, self.layout, self.n, self.round = store, layout, n, 0

    def next_round(self) -> list[tuple[np.ndarray, list[StoreEntry]]]:
        self.round += 1
        bt, out = self.layout.block_tokens, []
        for r in range(0, self.n, REQUEST_BLOCKS):
            k = min(REQUEST_BLOCKS, self.n - r)
            tokens = np.arange(k * bt, dtype=np.int64) + (self.round * self.n + r) * bt
            parent, entries = self.store.root, []
            for i in range(k):
                entries.append(StoreEntry.of(parent, tokens[i * bt:(i + 1) * bt]))
                parent = entries[-1].key
            out.append((tokens, entries))
        return out


@pytest.mark.parametrize("size", LAYOUTS)
def test_cpu_put(benchmark, size):
    store, layout, bb = _store(size)
    n = _blocks(size)
    src = torch.randint(0, 256, (n, bb), dtype=torch.uint8)
    slab = store.cpu.buffer
    slab.fill_(0)  # fault the slab in: neither side should pay first-touch page faults
    requests = Requests(store, layout, n)
    todo = []

    def memcpy():  # the same bytes into the same slots, no store
        for i in range(n):
            slab[i, :bb].copy_(src[i])

    def put():
        i = 0
        for _, entries in todo:
            slots = store.prepare_store(entries)
            for slot in slots:
                store.cpu.block_view(slot).copy_(src[i])
                i += 1
            store.complete_store([e.key for e in entries])
        assert i == n

    with store:
        got = Interleaved(memcpy, lambda: todo.__setitem__(slice(None), requests.next_round())).run(
            benchmark, put, n * bb)
    if got:
        _record(size, cpu_put_gbps=got[0], memcpy_put_gbps=got[1], cpu_put_ratio=got[2])


def test_noise_floor(benchmark):
    """A plain copy against itself, timed as the CPU ratios are: how far from 1.0
    a ratio lands on this machine when both sides do the very same work."""
    store, layout, bb = _store(HEADLINE)
    n = _blocks(HEADLINE)
    dst = torch.empty((n, bb), dtype=torch.uint8)
    dst.fill_(0)
    store.cpu.buffer.fill_(1)

    def memcpy():
        for i in range(n):
            dst[i].copy_(store.cpu.block_view(i))

    with store:
        baseline = Interleaved(memcpy)
        got = baseline.run(benchmark, memcpy, n * bb)
    if got:
        rounds = sorted(b / s for b, s in zip(baseline.times, benchmark.stats.stats.data))
        _noise.update(aa_ratio=round(got[2], 3), aa_round_ratio_min=round(rounds[0], 3),
                      aa_round_ratio_max=round(rounds[-1], 3), block=HEADLINE,
                      what="memcpy over memcpy, paired by round as the *_ratio figures are")


@pytest.mark.parametrize("size", LAYOUTS)
def test_cpu_get(benchmark, size):
    store, layout, bb = _store(size)
    n = _blocks(size)
    dst = torch.empty((n, bb), dtype=torch.uint8)
    dst.fill_(0)
    store.cpu.buffer.fill_(1)
    stored = Requests(store, layout, n).next_round()
    for _, entries in stored:
        store.prepare_store(entries)
        store.complete_store([e.key for e in entries])
    slots = [ref.slot for tokens, _ in stored for ref in store.lookup(tokens).blocks]
    assert len(slots) == n

    def memcpy():  # the same bytes out of the same slots, no store
        for i, slot in enumerate(slots):
            dst[i].copy_(store.cpu.block_view(slot))

    def get():
        i = 0
        for tokens, _ in stored:
            handle = store.prepare_load(store.lookup(tokens))
            handle.wait()
            for slot in handle.slots:
                dst[i].copy_(store.cpu.block_view(slot))
                i += 1
            store.complete_load(handle)
        assert i == n

    with store:
        got = Interleaved(memcpy).run(benchmark, get, n * bb)
    if got:
        _record(size, cpu_get_gbps=got[0], memcpy_gbps=got[1], cpu_get_ratio=got[2])


# -- SSD tier -------------------------------------------------------------------

@pytest.fixture
def ssd_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ssd")


def _slab(n: int, bb: int) -> CPUTier:
    cpu = CPUTier.create(2 * n * (bb + 8192), bb)
    cpu.buffer.copy_(torch.randint(0, 256, cpu.buffer.shape, dtype=torch.uint8))
    return cpu


def _ssd_setup(size: str, ssd_dir: Path):
    """(block bytes, blocks a round, a slab of random bytes, its first n slots, an SSD tier of 2 rounds)."""
    bb, n = LAYOUTS[size].raw_block_bytes(), _blocks(size)
    cpu = _slab(n, bb)
    tier = SSDTier(str(ssd_dir / "tier"), 2 * n * cpu.slot_stride, bb, b"bench-fp-0000000", IO_THREADS)
    return bb, n, cpu, [cpu.slot_view(i) for i in range(n)], tier


class Raw:
    """Sequential positional I/O of block_bytes per block, IO_THREADS in flight."""

    def __init__(self, path: Path, direct: bool, blocks: list[torch.Tensor], bb: int):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | (os.O_DIRECT if direct else 0), 0o600)
        self.direct, self.bb = direct, bb
        self.views = [memoryview(b.numpy())[:bb] for b in blocks]
        self.pool = ThreadPoolExecutor(IO_THREADS)

    def write(self):
        wait([self.pool.submit(os.pwritev, self.fd, [v], i * self.bb) for i, v in enumerate(self.views)])
        if not self.direct:
            os.fdatasync(self.fd)  # the same bytes on the device, as the O_DIRECT case

    def read(self):
        if not self.direct:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        wait([self.pool.submit(os.preadv, self.fd, [v], i * self.bb) for i, v in enumerate(self.views)])

    def close(self):
        self.pool.shutdown()
        os.close(self.fd)


def _drop_cache(directory: Path) -> None:
    for f in directory.glob("segment-*.kvs"):
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


@pytest.mark.parametrize("size", LAYOUTS)
def test_ssd_write(benchmark, size, ssd_dir):
    bb, n, cpu, src, tier = _ssd_setup(size, ssd_dir)
    raw = Raw(ssd_dir / "raw", tier.o_direct, src, bb)
    rounds = iter(range(1, 1 << 30))

    def write():
        r = next(rounds)
        futures = [tier.write(r.to_bytes(8, "little") + i.to_bytes(8, "little"), b"p" * 16, [r, i], src[i])
                   for i in range(n)]
        assert all(f.result() for f in futures)
        if not tier.o_direct:
            os.sync()  # buffered: count the bytes reaching the device, as the baseline does

    raw.write()  # allocate the raw file; the tier's first round below does the same
    write()
    got = Interleaved(raw.write).run(benchmark, write, n * bb)
    evictions = tier.stats()["evictions"]
    raw.close()
    tier.close()
    if got:
        _record(size, ssd_write_gbps=got[0], raw_write_gbps=got[1], ssd_write_ratio=got[2], ssd_o_direct=tier.o_direct,
                ssd_write_evictions=evictions)
        _ssd_dirs.append(ssd_dir)


@pytest.mark.parametrize("size", LAYOUTS)
def test_ssd_read(benchmark, size, ssd_dir):
    bb, n, cpu, src, tier = _ssd_setup(size, ssd_dir)
    dst = [cpu.slot_view(n + i) for i in range(n)]
    raw = Raw(ssd_dir / "raw", tier.o_direct, dst, bb)
    keys = [i.to_bytes(16, "little") for i in range(n)]
    assert all(f.result() for f in [tier.write(k, b"p" * 16, [i], s) for i, (k, s) in enumerate(zip(keys, src))])
    raw.write()

    def read():
        assert all(f.result() for f in [tier.read(k, d) for k, d in zip(keys, dst)])

    prepare = (lambda: None) if tier.o_direct else (lambda: _drop_cache(ssd_dir / "tier"))
    got = Interleaved(raw.read, prepare).run(benchmark, read, n * bb)
    assert torch.equal(dst[0][:bb], src[0][:bb])
    raw.close()
    tier.close()
    if got:
        _record(size, ssd_read_gbps=got[0], raw_read_gbps=got[1], ssd_read_ratio=got[2],
                ssd_read_source="O_DIRECT" if tier.o_direct else "buffered, page cache dropped (posix_fadvise)")
        _ssd_dirs.append(ssd_dir)


# -- the machine ------------------------------------------------------------------

def _machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    where = str(_ssd_dirs[0]) if _ssd_dirs else str(Path(__file__).parent)
    df = subprocess.run(["df", "--output=source,fstype", where], capture_output=True, text=True).stdout.split()
    return {
        "cpu": cpu, "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
        "kernel": platform.release(), "python": platform.python_version(), "torch": torch.__version__,
        "filesystem": df[-1] if len(df) >= 4 else "?", "device": df[-2] if len(df) >= 4 else "?",
        "note": "a cloud VM with a virtio disk on a shared host: absolute numbers drift between runs",
    }
