"""Two engines pointed at one ssd_path: the second refuses at start-up, saying why and what to do.

An SSD directory belongs to one engine (a flock on its LOCK file, released
when the owner dies): two writers would each evict the other's blocks from
under its index. Engine A serves a prompt and stays up; engine B, started
meanwhile with the same ssd_path, must fail to start with kvplug's message,
and A must keep serving.
"""

from __future__ import annotations

import threading
import time

import pytest

from vllm_e2e import P1, run_engine, same_output

pytestmark = pytest.mark.e2e


def test_a_second_engine_on_the_same_ssd_path_refuses_to_start(tiny_model, tmp_path, reference):
    kvplug = {"cpu_bytes": "256MiB", "codec": "raw", "ssd_path": str(tmp_path / "ssd"), "ssd_bytes": "1GiB"}
    first: dict = {}

    def serve_and_stay_up():
        first["result"] = run_engine(tiny_model, tmp_path, "a", [{"name": "p1", "prompts": [P1]}],
                                     kvplug=kvplug, linger_s=35)

    owner = threading.Thread(target=serve_and_stay_up)
    owner.start()
    deadline = time.monotonic() + 300
    while not (tmp_path / "a.out.json").exists() and owner.is_alive() and time.monotonic() < deadline:
        time.sleep(0.5)  # A has served its prompt and lingers, holding the directory
    assert (tmp_path / "a.out.json").exists(), "engine A did not come up"

    with pytest.raises(AssertionError) as failed:
        run_engine(tiny_model, tmp_path, "b", [{"name": "p1", "prompts": [P1]}], kvplug=kvplug)
    assert "is in use by another process" in str(failed.value)
    assert "give each process its own ssd_path" in str(failed.value)

    owner.join()
    (out,) = first["result"]["steps"]["p1"]["outputs"]
    same_output(out, reference["P1"][0])
