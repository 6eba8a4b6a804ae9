"""The TTFT bench's own logic, without starting vLLM (< 1 s): prompts, log parsing,
the profile timers, and the results JSON it writes (bench/e2e/ttft.py)."""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import pytest

E2E = Path(__file__).resolve().parents[2] / "bench" / "e2e"
sys.path.insert(0, str(E2E))

import harness  # noqa: E402
import profile_hooks  # noqa: E402
import ttft  # noqa: E402


def test_rounds_share_exactly_the_prefix():
    rounds = harness.make_rounds(2, 300, 20, vocab=1000)
    assert rounds[0].prefix != rounds[1].prefix
    for r in rounds:
        a, b, c = (r.prompt(x) for x in "ABC")
        assert len(a) == len(b) == len(c) == 320
        assert a[:300] == b[:300] == c[:300] == r.prefix
        assert len({a[300], b[300], c[300]}) == 3  # they part right after the prefix


LOG = """\
(EngineCore pid=1) INFO [ompmultiprocessing.py:185] \tVLLM_CPU_OMP_THREADS_BIND='auto', auto_setup=True, skip_setup=False
(EngineCore pid=1) INFO [ompmultiprocessing.py:185] \tlocal_world_size=1, reserve_cpu_num=1
(EngineCore pid=1) INFO [ompmultiprocessing.py:185] \tlocal_rank=0, core ids=[0]
(EngineCore pid=1) INFO [ompmultiprocessing.py:185] \treserved_cpus=[1]
(MainProcess pid=0) INFO [scheduler.py:307] Chunked prefill is enabled with max_num_batched_tokens=4096.
(EngineCore pid=1) INFO [torch_utils.py:295] Reducing Torch threads from 2 to 1 for serving.
(EngineCore pid=1) INFO [scheduler.py:307] kvplug: store stats at shutdown: {'cpu': {'hit_blocks': 3}, 'store': {'lookups': 2}}
"""


def test_log_parsing():
    assert harness.store_stats(LOG) == {"cpu": {"hit_blocks": 3}, "store": {"lookups": 2}}
    assert harness.store_stats("no kvplug here") is None
    assert harness.thread_layout(LOG) == {
        "omp_threads_bind": "auto", "reserve_cpu_num": "1", "worker_core_ids": "[0]",
        "reserved_cpus": "[1]", "torch_threads": "Reducing Torch threads from 2 to 1",
        "max_num_batched_tokens": "4096"}


def test_timers_wrap_a_module_imported_later(tmp_path, monkeypatch):
    pkg = tmp_path / "src"
    pkg.mkdir()
    (pkg / "ttft_fake_mod.py").write_text("class K:\n    def f(self, x):\n        return g(x) + 1\n\n\n"
                                          "def g(x):\n    return x\n")
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setattr(profile_hooks, "TIMED", [("ttft_fake_mod", "K", "f"), ("ttft_fake_mod", None, "g")])
    before = list(sys.meta_path)
    try:
        profile_hooks.install_on_import(tmp_path / "prof")
        import ttft_fake_mod

        assert ttft_fake_mod.K().f(1) == 2
    finally:
        sys.meta_path[:] = before
        sys.modules.pop("ttft_fake_mod", None)
    recs = profile_hooks.records(tmp_path / "prof")
    assert sorted(r[4] for r in recs) == ["K.f", "g"]
    rec = next(r for r in recs if r[4] == "K.f")
    per_req = profile_hooks.attribute(tmp_path / "prof", {"hit": (rec[0] - 1, rec[0] + 1), "other": (0, 1)})
    assert per_req["hit"]["K.f"]["calls"] == 1 and per_req["other"] == {}


def _fake_runs(n: int) -> dict:
    def q(name, ttft_s, tokens, **kvplug):
        return {"name": name, "prompt_tokens": 4160, "ttft_s": ttft_s, "arrival_wall": 0.0, "queued_s": 0.0,
                "prefill_s": ttft_s, "generate_wall_s": ttft_s, "cached_tokens": 0,
                "token_ids": tokens, "kvplug": kvplug}

    def run(name, reqs, stats=None):
        return harness.EngineRun(name, reqs, 20.0, 40.0, "", stats, {"worker_core_ids": "[0]"})

    rs = range(1, n + 1)
    return {
        "kvplug_cpu": run("kvplug_cpu", [x for r in rs for x in (
            q(f"A{r}", 8.0, [1, r]), q(f"B{r}", 0.3, [2, r], hit_tokens_cpu=4096))], {"cpu": {"hit_blocks": 32}}),
        "kvplug_ssd_restart": run("kvplug_ssd_restart", [q(f"C{r}", 0.5, [3, r], hit_tokens_ssd=4096) for r in rs]),
        "vllm_apc": run("vllm_apc", [x for r in rs for x in (q(f"A{r}", 7.0, [1, r]), q(f"B{r}", 0.2, [2, r]))]),
        "vllm_no_apc": run("vllm_no_apc", [x for r in rs for x in (q(f"B{r}", 7.5, [2, r]), q(f"C{r}", 7.5, [3, r]))]),
    }


def test_results_json_has_every_figure():
    args = argparse.Namespace(rounds=2, prefix_tokens=4096, suffix_tokens=64, max_tokens=8, profile=False)
    res = {"runs": _fake_runs(2), "info": {"params": 85_000_000, "layers": 12, "hidden": 768, "path": "/m"},
           "prompt_tokens": 4160, "max_model_len": 4352, "machine": {"cpu": "x", "cores": 2},
           "load_before": [0.1, 0.2, 0.3], "load_after": [0.4, 0.5, 0.6], "wall_s": 300.0}
    out = ttft.summarize(args, res)
    json.dumps(out)  # serializable
    for key in ("machine", "model", "prompt_tokens", "shared_prefix_tokens", "cold_ttft_s", "cpu_hit_ttft_s",
                "ssd_hit_ttft_s", "apc_hit_ttft_s", "no_kvplug_cold_ttft_s", "ratios", "outputs_identical",
                "hit_counters", "thread_layout"):
        assert key in out, key
    assert out["cold_ttft_s"] == 8.0 and out["cpu_hit_ttft_s"] == 0.3
    assert out["ratios"]["cpu_hit_over_cold"] == pytest.approx(0.0375)
    assert out["ratios"]["ssd_hit_over_cold"] == pytest.approx(0.0625)
    assert out["targets"]["cpu_hit_over_cold"]["met"] and out["targets"]["ssd_hit_over_cold"]["met"]
    assert out["outputs_identical"] is True
    assert out["hit_counters"]["cpu_hit (B requests, kvplug_cpu)"] == {"hit_tokens_cpu": 8192}
    assert out["thread_layout"]["identical"] is True

    runs = _fake_runs(2)
    runs["kvplug_ssd_restart"].requests[1]["token_ids"] = [9, 9]  # a hit that changed the output
    out = ttft.summarize(args, {**res, "runs": runs})
    assert out["outputs_identical"] is False
    assert out["outputs_identical_detail"]["ssd_hit_C_vs_cold_no_kvplug"] is False


def test_profile_summary():
    args = argparse.Namespace(rounds=2, profile=True)
    runs = _fake_runs(2)
    for r in (1, 2):
        runs["kvplug_cpu"].profile = {**(runs["kvplug_cpu"].profile or {}), f"B{r}": {
            "WorkerHalf._decode_layers": {"ms": 200.0, "calls": 1},
            "SchedulerHalf.get_num_new_matched_tokens": {"ms": 1.0, "calls": 1}}}
        runs["kvplug_ssd_restart"].profile = {**(runs["kvplug_ssd_restart"].profile or {}), f"C{r}": {
            "WorkerHalf._decode_layers": {"ms": 190.0, "calls": 1}, "ssd_promotion_span_ms": 40.0}}
    out = ttft._profile(args, runs)
    s = out["summary_ms"]
    assert s["cpu_hit_minus_apc_hit_ttft"] == pytest.approx(100.0)
    assert s["cpu_hit_worker_load (transfer thread, all layers: LayerPipeline._cpu_load_job | "
             "WorkerHalf._decode_layers)"] == 200.0
    assert s["ssd_hit_promotion_span (first SSDTier.read -> last _read_done)"] == 40.0
    assert s["cpu_hit_scheduler_half"] == 1.0
