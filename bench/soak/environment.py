"""What was measured: the machine, the code (commit, kvplug files changed, a hash of kvplug's
sources) and the tiny model (built once into kvplug's cache)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from kvplug.bench import environment
from kvplug.bench.environment import machine  # noqa: F401 - part of this module's interface

from .engines import BLOCK, ROOT


def code_state() -> dict:
    return environment.code_state(ROOT)


def model_path() -> str:
    """The tiny model (4 layers, 2 KV heads x 64), built once into kvplug's cache."""
    from kvplug.tools.tiny_model import build

    base = Path(os.environ.get("KVPLUG_CACHE", Path.home() / ".cache" / "kvplug"))
    return build(base / "models" / "tiny-s0")


def model_info(path: str) -> dict:
    cfg = json.loads((Path(path) / "config.json").read_text())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_bytes_per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 2
    return {"path": path, "layers": cfg["num_hidden_layers"], "hidden": cfg["hidden_size"],
            "kv_heads": cfg["num_key_value_heads"], "head_dim": head_dim, "vocab": cfg["vocab_size"],
            "kv_bytes_per_token": kv_bytes_per_token, "block_bytes": kv_bytes_per_token * BLOCK}
