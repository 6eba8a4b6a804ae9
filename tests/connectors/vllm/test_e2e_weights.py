"""A model whose weights change in place is another model: none of its old KV may be served.

A checkpoint directory can be rewritten under the same path (a fine-tune
saved over the old one, a corrected upload); the KV that the SSD tier holds
for the old weights is then wrong for the new ones, however equal the path,
the config and the layout.

Engine A (kvplug, SSD tier) runs W on a private copy of the tiny model and
exits; W's blocks are on SSD. One tensor of the copy's model.safetensors is
then changed in place (same file, same size). Engine B (a new process, the
same ssd_path) runs W: no hit, and the output of an engine without kvplug on
the changed weights; W again hits what B stored itself. The control (same
weights: the restart hits from SSD) is test_e2e_ssd.py's
test_restart_restores_prompt_from_ssd.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import struct
from pathlib import Path

import numpy as np
import pytest

from vllm_e2e import BLOCK, run_engine, same_output, tokens

pytestmark = pytest.mark.e2e

W = tokens(40, 300)
TENSOR = "model.layers.0.self_attn.v_proj.weight"


def change_tensor_in_place(path: Path, name: str, factor: float) -> None:
    """Multiply one bf16 tensor of a safetensors file by ``factor``, rewriting its bytes in place."""
    import torch

    with open(path, "r+b") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        info = json.loads(f.read(header_len))[name]
        assert info["dtype"] == "BF16", info
        start, end = info["data_offsets"]
        f.seek(8 + header_len + start)
        raw = bytearray(f.read(end - start))
        t = torch.frombuffer(raw, dtype=torch.bfloat16)
        changed = (t.float() * factor).to(torch.bfloat16)
        assert not torch.equal(changed, t)
        f.seek(8 + header_len + start)
        f.write(changed.view(torch.uint8).numpy().tobytes())


def stored_blocks(ssd_path: Path, prompt: list[int]) -> int:
    """How many of the prompt's full blocks the SSD manifest holds."""
    with sqlite3.connect(f"file:{ssd_path / 'manifest.sqlite3'}?mode=ro", uri=True) as db:
        return sum(
            len(db.execute("SELECT key FROM blocks WHERE tokens = ?",
                           (np.asarray(prompt[i * BLOCK:(i + 1) * BLOCK], dtype="<i8").tobytes(),)).fetchall()) > 0
            for i in range(len(prompt) // BLOCK))


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e-weights")
    model = work / "model"
    shutil.copytree(tiny_model, model)
    ssd = work / "ssd"
    kvplug = {"cpu_bytes": "64MiB", "ssd_path": str(ssd), "ssd_bytes": "256MiB", "codec": "raw"}
    before = run_engine(str(model), work, "weights-before", [{"name": "w", "prompts": [W]}],
                        kvplug=kvplug, linger_s=2)
    on_ssd = stored_blocks(ssd, W)
    size = (model / "model.safetensors").stat().st_size
    change_tensor_in_place(model / "model.safetensors", TENSOR, 1.25)
    assert (model / "model.safetensors").stat().st_size == size
    after = run_engine(str(model), work, "weights-after", [
        {"name": "w", "prompts": [W]}, {"name": "w_again", "prompts": [W]},
    ], kvplug=kvplug)
    reference = run_engine(str(model), work, "weights-reference", [{"name": "w", "prompts": [W]}])
    return before, on_ssd, after, reference["steps"]["w"]["outputs"][0]


def test_first_engine_stores_prompt_on_ssd(runs):
    before, on_ssd, _, _ = runs
    (out,) = before["steps"]["w"]["outputs"]
    assert out["cached_tokens"] == 0
    assert on_ssd == len(W) // BLOCK


def test_changed_tensor_changes_output(runs):
    # Otherwise loading the old KV could not be told from computing the new.
    before, _, _, ref = runs
    assert before["steps"]["w"]["outputs"][0]["logprobs"] != ref["logprobs"]


def test_changed_weights_get_no_hit(runs):
    _, _, after, ref = runs
    step = after["steps"]["w"]
    (out,) = step["outputs"]
    assert out["cached_tokens"] == 0
    assert step["counters"].get("hit_tokens_ssd", 0) == 0
    same_output(out, ref)


def test_changed_weights_store_their_own_kv(runs):
    _, _, after, ref = runs
    (out,) = after["steps"]["w_again"]["outputs"]
    assert out["cached_tokens"] == len(W) - 1
    same_output(out, ref)
