"""``kvplug bench report``: plots and the README table from a small set of results files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvplug.bench import report
from kvplug.cli import main

MACHINE = {"cpu": "Test CPU", "cores": 2, "versions": {"vllm": "0.32.0", "torch": "2.13.0+cpu", "lmcache": "0.5.6"}}
MODEL = {"name": "bench-s0", "layers": 12, "hidden": 768, "kv_bytes_per_token": 12288}
WORKLOAD = {"name": "chat", "requests": 32, "prompt_tokens": 46704, "unique_tokens": 12407,
            "prefill_floor_tokens": 12407}


def run_doc(config: str, ttft: float, rps: float, concurrency: int = 8, repeat: int = 1, kv_cpu: float = 0.0,
            kv_ssd: float = 0.0, status: str = "ok", why: str | None = None, session: str | None = "s1") -> dict:
    doc = {"bench": "serve", "status": status, "config": {"name": config}, "workload": WORKLOAD,
           "concurrency": concurrency, "repeat": repeat, "machine": MACHINE, "model": MODEL,
           "sizing": {"kv_blocks": 30}, "load_avg_before": [2.0, 2, 2], "load_avg_after": [3.0, 3, 3],
           "peak_rss_bytes": 3 << 30}
    if session:
        doc["session"] = {"id": session, "started_at": "2026-12-01T05:00:00Z", "rep": repeat}
    if status != "ok":
        return {**doc, "why": why}
    computed = 46704 - 2000 - kv_cpu - kv_ssd
    doc["summary"] = {"ttft_s": {"p50": ttft, "p90": 2 * ttft}, "throughput_rps": rps,
                      "tpot_s": {"p50": 0.05}, "itl_s": {"p50": 0.04, "p99": 0.2},
                      "output_tok_s": rps * 32, "prompt_tokens": 46704, "prefill_tokens_computed": computed,
                      "hit_tokens": {"vllm_prefix_cache": 2000.0, "external": kv_cpu + kv_ssd,
                                     "kvplug_cpu": kv_cpu, "kvplug_ssd": kv_ssd},
                      "kvplug": {"load_bytes": (kv_cpu + kv_ssd) * 1024.0, "save_bytes": 5 << 20} if kv_cpu else None}
    return doc


def legacy(doc: dict) -> dict:
    """A results file from before per-gap ITL: its itl_s is each request's mean gap (TPOT)."""
    doc["summary"]["itl_s"] = doc["summary"].pop("tpot_s")
    return doc


def timed(doc: dict) -> dict:
    doc["summary"]["vllm"] = {"queue_time_s_sum": 8.0, "prefill_time_s_sum": 4.0, "decode_time_s_sum": 2.0,
                              "requests_success": 4.0}
    return doc


@pytest.fixture
def results(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    docs = [run_doc("vllm", 4.0, 0.10), run_doc("kvplug-raw", 0.5, 0.30, kv_cpu=30000, kv_ssd=1000),
            run_doc("kvplug-raw", 0.6, 0.32, repeat=2, kv_cpu=30000, kv_ssd=1000),
            legacy(run_doc("vllm", 3.0, 0.20, concurrency=16)),
            timed(run_doc("kvplug-raw", 0.4, 0.50, concurrency=16)),
            {**run_doc("lmcache", 0.8, 0.25, concurrency=16), "lmcache_peak_rss_bytes": 1 << 29},
            run_doc("lmcache", 0, 0, status="failed", why="ServerFailed: lmcache server exited (1)\nmore")]
    for i, doc in enumerate(docs):
        (d / f"run{i}.json").write_text(json.dumps(doc))
    (d / "other.json").write_text(json.dumps({"bench": "something else"}))
    return d


def test_report_writes_plots_and_the_readme_table(results, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Benchmarks\n\n{report.START}\nold table\n{report.END}\n\n## Next\nkept\n")
    assert main(["bench", "report", "--results", str(results), "--plots", str(tmp_path / "plots"),
                 "--write", str(readme)]) == 0
    for name in ("ttft", "throughput", "hits"):
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    text = readme.read_text()
    assert "old table" not in text and text.endswith("## Next\nkept\n")
    assert "![TTFT p50/p90 per configuration](plots/ttft.png)" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert "**chat on bench-s0**, concurrency 8 (model: 12 layers" in text
    assert "**chat on bench-s0**, concurrency 16" in text
    # two kvplug-raw runs at concurrency 8: medians 0.55 s and 0.31 req/s, their spread, ratios to vLLM alone
    raw = [line for line in text.splitlines() if line.startswith("| kvplug-raw | 0.550")]
    assert len(raw) == 1
    cells = [c.strip() for c in raw[0].strip("|").split("|")]
    assert cells[1:4] == ["0.550", "1.100", "0.14‡"]  # run 2 has no vLLM-alone partner in its session
    assert cells[4:6] == ["50.0", "40.0 / 200.0"]  # TPOT p50; ITL p50 / p99 over every gap
    assert cells[6:8] == ["0.310", "3.10‡"]
    assert cells[10] == "CPU 30,000 / SSD 1,000"
    assert cells[11] == "30 / 5"  # MiB loaded / saved, all tiers
    assert cells[12] == "-"  # these runs did not record vLLM's queue/prefill/decode times
    assert cells[13] == "3.00"
    assert cells[14].startswith("2: TTFT 18%, req/s 6%")
    vllm16 = [c.strip() for c in next(line for line in text.splitlines()
                                      if line.startswith("| vllm | 3.000")).strip("|").split("|")]
    assert vllm16[4:6] == ["50.0", "-"]  # a legacy file's itl_s is TPOT: no ITL over gaps to show
    assert "| 3.50 (3.00 + LMCache server 0.50) |" in text
    assert "Machine: Test CPU, 2 cores, no GPU; vLLM 0.32.0 (CPU)" in text
    assert "counts in every process that maps it" in text
    assert "| 2.00 / 1.00 / 0.50 |" in text  # mean queue / prefill / decode seconds, from vLLM's histograms
    assert "| lmcache | did not run: ServerFailed: lmcache server exited (1) |" in text
    assert "‡ no vLLM-alone run in the same session" in text
    written = text.split(report.START + "\n", 1)[1].split("\n" + report.END, 1)[0]
    assert len(rows) == 8 and all(line in written for line in rows)  # headers + 3 rows at c=8, 3 at c=16
    printed = capsys.readouterr().out
    assert printed == f"{written}\nwrote the Benchmarks table into {readme}\n"  # the table printed is the one written


def test_hit_shares_of_the_committed_runs_add_up_to_one():
    # two independent counts: tokens computed from vLLM's usage (prompt - cached, per request) and hits
    # from /metrics (vLLM's prefix cache, kvplug per tier, any connector): they must partition the prompt
    files = sorted((Path(__file__).resolve().parents[2] / "bench" / "results" / "serve").glob("*.json"))
    docs = [json.loads(f.read_text()) for f in files]
    assert len(docs) >= 20
    for doc in docs:
        shares = report.hit_shares(doc["summary"])
        assert sum(shares.values()) == pytest.approx(1.0), doc["config"]["name"]
        assert all(v >= 0 for v in shares.values())


def test_hit_shares_are_not_normalized():
    s = run_doc("kvplug-raw", 0.5, 0.3, kv_cpu=30000, kv_ssd=1000)["summary"]
    shares = report.hit_shares(s)
    assert shares["kvplug CPU"] == pytest.approx(30000 / 46704) and shares["LMCache"] == 0
    s["prefill_tokens_computed"] += 4670  # vLLM's usage and the hit counters disagree: the shares show it
    assert sum(report.hit_shares(s).values()) == pytest.approx(1.1, abs=1e-3)


def test_the_machine_line_names_a_gpu():
    m = {**MACHINE, "gpu": {"name": "NVIDIA H200", "count": 1}}
    assert report.machine_line(m).startswith("Machine: Test CPU, 2 cores, GPU NVIDIA H200; vLLM 0.32.0, torch")
    assert "no GPU; vLLM 0.32.0 (CPU)" in report.machine_line(MACHINE)


def test_report_without_results_says_what_to_run(tmp_path, capsys):
    assert main(["bench", "report", "--results", str(tmp_path)]) == 2
    assert "run 'kvplug bench run' first" in capsys.readouterr().out


def test_ratios_pair_runs_of_one_session():
    base = [run_doc("vllm", 4.0, 0.10, repeat=1), run_doc("vllm", 2.0, 0.20, repeat=2)]
    runs = [run_doc("kvplug-raw", 1.0, 0.30, repeat=1), run_doc("kvplug-raw", 1.0, 0.30, repeat=2),
            run_doc("kvplug-raw", 1.5, 0.30, repeat=3)]  # no partner: against vLLM alone's median (3.0 s)
    assert report.paired_ratio(runs, base, report.TTFT50) == pytest.approx(0.5)  # of 0.25, 0.5, 0.5
    assert report.paired_ratio(runs, base, report.RPS) == pytest.approx(2.0)     # of 3, 1.5, 2
    assert report.paired_ratio(runs, [], report.RPS) is None
    assert report.pairing(runs, base) == "‡" and report.pairing(runs[:2], base) == ""


def test_ratios_pair_by_session_not_by_file_number():
    # session "a" ran vLLM alone and kvplug side by side; session "b" only kvplug, later, into the
    # next free file numbers: its -1 file must not be set against session a's vLLM alone
    base = [run_doc("vllm", 4.0, 0.10, session="a")]
    runs = [run_doc("kvplug-raw", 1.0, 0.30, session="b"), run_doc("kvplug-raw", 2.0, 0.20, repeat=2, session="a")]
    runs[0]["repeat"], runs[1]["repeat"] = 1, 2  # file numbers: b's is -1, a's -2
    assert report.paired_ratio(runs[1:], base, report.TTFT50) == pytest.approx(0.5)
    assert report.paired_ratio(runs[:1], base, report.TTFT50) == pytest.approx(0.25)  # median: none in b
    runs[1]["session"]["rep"] = 1
    assert report.paired_ratio(runs[1:], base, report.TTFT50) == pytest.approx(0.5)
    assert report.pairing(runs[1:], base) == "" and report.pairing(runs[:1], base) == "‡"


def test_files_without_a_session_pair_by_file_number_and_say_so(tmp_path):
    docs = [run_doc("vllm", 4.0, 0.1, session=None), run_doc("kvplug-raw", 1.0, 0.3, session=None)]
    assert report.paired_ratio(docs[1:], docs[:1], report.TTFT50) == pytest.approx(0.25)
    assert report.pairing(docs[1:], docs[:1]) == "†"
    table = report.markdown(docs, {})
    assert "| 0.25† |" in table and "† paired with vLLM alone by results file number" in table


def test_the_bytes_column_adds_what_each_backing_tier_moved():
    cpu_only = {"kvplug": {"load_bytes": 3 << 20, "save_bytes": 5 << 20}}
    assert report._bytes(cpu_only) == "3 / 5"  # results files from before the per-tier counters
    tiers = {"kvplug": {"load_bytes": 3 << 20, "save_bytes": 5 << 20, "ssd_read_bytes": 2 << 20,
                        "ssd_write_bytes": 7 << 20, "remote_read_bytes": 0.0, "remote_write_bytes": 0.0}}
    assert report._bytes(tiers) == "3 / 5; ssd 2 / 7"
    assert report._bytes({"kvplug": None}) == "-"
