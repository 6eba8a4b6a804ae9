"""``kvplug bench run``'s runner without a vLLM engine: results files, settled metrics, deadlines."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from kvplug.bench import metrics, runner, workloads
from kvplug.bench.configs import configurations

CONFIG = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
          "vocab_size": 512}


def _model(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    return str(d)


def test_every_results_file_of_a_session_carries_its_id(tmp_path, monkeypatch):
    # a server that exits at once: the configuration "could not run", and its file says why and when
    monkeypatch.setattr(runner, "kvplug_command", lambda: [sys.executable, "-c", "raise SystemExit(3)"])
    model = _model(tmp_path)
    w = workloads.noreuse(512, prompts=2, prompt_tokens=16)
    sizing = runner.Sizing.of(w, runner.model_info(model), 0.5)
    configs = configurations(1 << 20, 1 << 20, 1 << 30)
    session = runner.new_session()
    paths = [runner.run_one(configs[n], w, 1, model, sizing, tmp_path / "out", 1, session=session)
             for n in ("vllm", "kvplug-raw", "vllm")]
    docs = [json.loads(p.read_text()) for p in paths]
    assert [p.name[-9:] for p in paths] == ["c1-1.json", "c1-1.json", "c1-2.json"]  # the next free number
    assert all(d["session"] == {**session, "rep": 1} for d in docs)
    assert docs[0]["status"] == "failed" and "exited (3)" in docs[0]["why"]
    other = runner.run_one(configs["vllm"], w, 1, model, sizing, tmp_path / "out", 1)
    assert json.loads(other.read_text())["session"]["id"] != session["id"]


SCRAPE = """# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total {cpu}
# TYPE vllm:kvplug_hit_tokens counter
vllm:kvplug_hit_tokens_total{{engine="0"}} {hits}
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{{engine="0"}} 1000.0
"""


def test_settled_metrics_ignore_what_moves_on_every_scrape(monkeypatch):
    scrapes = [(1.0, 10), (1.5, 20), (2.0, 20), (2.5, 20)]  # kvplug's counter moves once, the CPU always
    seen = []

    def scrape(url):
        cpu, hits = scrapes[len(seen)]
        seen.append(cpu)
        return metrics.parse(SCRAPE.format(cpu=cpu, hits=hits))

    monkeypatch.setattr(metrics, "scrape", scrape)
    out = runner._settled_metrics("http://x", timeout=5, poll_s=0.001)
    assert seen == [1.0, 1.5, 2.0]  # settled at the third scrape: the first two differ in kvplug's counter
    assert metrics.kvplug_counters(out) == {"hit_tokens": 20.0}


def test_a_stuck_server_fails_its_requests_and_the_run_says_why(tmp_path, monkeypatch):
    stuck = str(Path(__file__).with_name("stuck_server.py"))
    monkeypatch.setattr(runner, "kvplug_command", lambda: [sys.executable, stuck])
    model = _model(tmp_path)
    w = workloads.noreuse(512, prompts=4, prompt_tokens=16)
    sizing = runner.Sizing.of(w, runner.model_info(model), 0.5)
    config = configurations(1 << 20, 1 << 20, 1 << 30)["vllm"]
    t0 = time.monotonic()
    doc = json.loads(runner.run_one(config, w, 2, model, sizing, tmp_path / "out", request_timeout_s=0.5,
                                    deadline_s=60).read_text())
    assert doc["status"] == "failed" and doc["why"].startswith("4 requests failed: request timeout: no complete "
                                                               "answer within 0.5 s")
    doc = json.loads(runner.run_one(config, w, 2, model, sizing, tmp_path / "out", request_timeout_s=60,
                                    deadline_s=0.8).read_text())
    assert doc["why"].startswith("run deadline of 0.8 s passed with 4 of 4 requests unfinished")
    assert doc["limits"] == {"request_timeout_s": 60, "run_deadline_s": 0.8}
    assert [r["error"][:12] for r in doc["requests"]] == ["run deadline"] * 4
    assert doc["server_cpu_s"] > 0  # the server tree's CPU seconds, sampled with its RSS
    assert time.monotonic() - t0 < 30  # and neither run waited for the server's hour-long stall


def test_itl_is_every_gap_and_tpot_each_requests_mean(tmp_path):
    from kvplug.bench import client
    from kvplug.bench.server import Server, free_port

    port = free_port()
    server = Server("stuck", [sys.executable, str(Path(__file__).with_name("stuck_server.py")), "--port", str(port)],
                    tmp_path / "log", {})
    try:
        server.wait_http(f"http://127.0.0.1:{port}/health", 30)
        reqs = [workloads.Request(f"r{i}", "s", 0, list(range(64)), 5) for i in range(2)]  # answered at once
        results, wall = client.drive(f"http://127.0.0.1:{port}", "m", reqs, 2)
    finally:
        server.stop()
    assert all(len(r["itl_gaps_s"]) == 4 and "error" not in r for r in results)
    w = workloads.Workload("t", {}, reqs)
    s = runner.summarize(results, wall, w, {}, {})
    gaps = sorted(g for r in results for g in r["itl_gaps_s"])
    assert s["itl_s"]["max"] == gaps[-1] and s["itl_s"]["min"] == gaps[0]
    assert sorted(s["tpot_s"].values())[0] >= 0 and s["tpot_s"]["max"] == max(r["tpot_s"] for r in results)


def test_machine_names_the_gpu_torch_sees(monkeypatch):
    import types

    from kvplug.bench import environment

    cuda = types.SimpleNamespace(is_available=lambda: True, get_device_name=lambda i: "NVIDIA H200",
                                 device_count=lambda: 1)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    assert environment.machine()["gpu"] == {"name": "NVIDIA H200", "count": 1}
    cuda.is_available = lambda: False
    assert environment.machine()["gpu"] is None
