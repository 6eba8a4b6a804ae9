"""kvplug's SSD tier across an engine restart: restored KV gives the very same
output; a block corrupted on disk between the runs is a miss and is recomputed.

Engine A stores Q1 and Q2 (write-through to SSD) and exits. One block of Q2 is
then corrupted on disk. Engine B (a new process, a new empty CPU tier, the same
ssd_path) runs Q1 — every block promoted from SSD — and Q2, which hits only up
to the corrupt block.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from vllm_e2e import BLOCK, Q1, Q2, run_engine, same_output

pytestmark = pytest.mark.e2e


def corrupt_block(ssd_path: Path, tokens: list[int]) -> None:
    """Flip bytes in the stored block holding exactly these tokens (found through the
    manifest by its tokens, and on disk by the key in its slot header)."""
    with sqlite3.connect(f"file:{ssd_path / 'manifest.sqlite3'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT key FROM blocks WHERE tokens = ?",
                          (np.asarray(tokens, dtype="<i8").tobytes(),)).fetchall()
    assert len(rows) == 1, f"expected one stored block with these tokens, found {len(rows)}"
    key = rows[0][0]
    for segment in sorted(ssd_path.glob("segment-*.kvs")):
        data = bytearray(segment.read_bytes())
        at = data.find(key)
        if at >= 0:
            # The header (magic, version, reserved, fingerprint, key, ...) follows the
            # block's bytes: damage the block just before it.
            block_end = at - 8 - 4 - 4 - 16
            data[block_end - 64:block_end] = bytes(255 - b for b in data[block_end - 64:block_end])
            segment.write_bytes(data)
            return
    raise AssertionError("the block's slot header was not found in any segment")


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e-ssd")
    ssd = work / "ssd"
    kvplug = {"cpu_bytes": "64MiB", "ssd_path": str(ssd), "ssd_bytes": "256MiB", "codec": "raw"}
    first = run_engine(tiny_model, work, "ssd-first", [
        {"name": "q1", "prompts": [Q1]}, {"name": "q2", "prompts": [Q2]},
    ], kvplug=kvplug, linger_s=2)
    corrupt_block(ssd, Q2[BLOCK:2 * BLOCK])
    second = run_engine(tiny_model, work, "ssd-restart", [
        {"name": "q1", "prompts": [Q1]}, {"name": "q2", "prompts": [Q2]}, {"name": "q2_again", "prompts": [Q2]},
    ], kvplug=kvplug)
    return first, second


def test_first_run_computes_and_matches_reference(runs, reference):
    first, _ = runs
    for name, ref in (("q1", "Q1"), ("q2", "Q2")):
        (out,) = first["steps"][name]["outputs"]
        assert out["cached_tokens"] == 0
        same_output(out, reference[ref][0])


def test_restart_restores_prompt_from_ssd(runs, reference):
    _, second = runs
    step = second["steps"]["q1"]
    (out,) = step["outputs"]
    assert out["cached_tokens"] == len(Q1) - 1
    assert step["counters"]["hit_tokens_ssd"] == len(Q1) - 1
    assert step["counters"]["promotions"] == 1
    same_output(out, reference["Q1"][0])


def test_corrupt_block_is_a_miss_and_recomputed(runs, reference):
    _, second = runs
    step = second["steps"]["q2"]
    (out,) = step["outputs"]
    assert out["cached_tokens"] == BLOCK  # the hit ends where the corrupt block starts
    assert step["counters"]["promotion_failed_blocks"] >= 1
    same_output(out, reference["Q2"][0])
    # The recomputed block was stored again: the whole prompt hits now.
    (again,) = second["steps"]["q2_again"]["outputs"]
    assert again["cached_tokens"] == len(Q2) - 1
    same_output(again, reference["Q2"][0])
