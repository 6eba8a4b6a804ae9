"""``kvplug bench run`` end to end on the tiny model: one kvplug server, a 2 x 2 chat, a results
file whose figures add up (every token past the workload's prefill floor was a hit), and
``kvplug bench report`` over it."""

from __future__ import annotations

import json

import pytest

from kvplug.cli import main

pytestmark = pytest.mark.e2e


def test_bench_run_and_report(tmp_path, capsys):
    out = tmp_path / "results"
    rc = main(["bench", "run", "--workload", "chat", "--model", "tiny", "--configs", "kvplug-raw",
               "--users", "2", "--rounds", "2", "--system-tokens", "100", "--doc-tokens", "300",
               "--new-min", "100", "--new-max", "150", "--output-tokens", "8", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "chat-tiny-s0-kvplug-raw-c2-1.json").read_text())
    assert doc["status"] == "ok", doc.get("why")
    s = doc["summary"]
    assert (s["requests"], s["failed"]) == (4, 0)
    assert all(r["output_tokens"] == 8 and r["ttft_s"] > 0 for r in doc["requests"])
    # round 2 of each chat hits the whole of round 1's prompt: only the floor is computed
    assert s["prefill_tokens_computed"] == s["prefill_floor_tokens"] == doc["workload"]["unique_tokens"]
    assert s["kvplug"]["hit_tokens"] > 0 and s["kvplug"]["errors"] == 0
    assert s["throughput_rps"] > 0 and doc["peak_rss_bytes"] > 100 << 20
    assert "--kv-transfer-config" in doc["server_command"] and doc["machine"]["load_avg"]
    capsys.readouterr()

    assert main(["bench", "report", "--results", str(out)]) == 0
    assert "| kvplug-raw |" in capsys.readouterr().out
    assert (out / "ttft.png").exists()


def test_bench_run_refuses_an_unknown_configuration(capsys):
    assert main(["bench", "run", "--configs", "vllm,sglang"]) == 2
    assert "--configs sglang not known" in capsys.readouterr().out
