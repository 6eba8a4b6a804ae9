"""The store's fingerprint changes with anything that changes KV bytes, and nothing else."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

from kvplug.connectors.vllm.identity import model_fingerprint, weights_digest


class HFConfig(dict):
    def to_dict(self):
        return dict(self)


def vllm_config(model_dir: str, **changes):
    model = SimpleNamespace(model=model_dir, revision=None, quantization=None, dtype="bfloat16",
                            hf_config=HFConfig(rope_scaling=None, hidden_size=64), max_model_len=2048)
    cache = SimpleNamespace(cache_dtype="auto", block_size=16)
    for key, value in changes.items():
        target = cache if key in ("cache_dtype", "block_size") else model
        setattr(target, key, value)
    return SimpleNamespace(model_config=model, cache_config=cache)


def fp(model_dir, tp=1, codec="raw", **changes) -> bytes:
    return model_fingerprint(vllm_config(str(model_dir), **changes), {"layers": 2}, {"codec": codec}, codec, tp)


def make_model(path):
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"A" * 4096)
    (path / "config.json").write_text("{}")
    return path


def test_same_model_same_fingerprint_across_calls(tmp_path):
    m = make_model(tmp_path / "m")
    assert fp(m) == fp(m)


def test_a_weight_file_rewritten_in_place_changes_it(tmp_path):
    m = make_model(tmp_path / "m")
    before = fp(m)
    st = os.stat(m / "model.safetensors")
    (m / "model.safetensors").write_bytes(b"B" + b"A" * 4095)  # same size
    os.utime(m / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old mtime
    assert fp(m) != before


def test_every_kv_relevant_setting_changes_it(tmp_path):
    m = make_model(tmp_path / "m")
    base = fp(m)
    changed = [
        fp(m, quantization="awq"),
        fp(m, cache_dtype="fp8"),
        fp(m, block_size=32),
        fp(m, tp=2),
        fp(m, codec="int4h"),
        fp(m, dtype="float16"),
        fp(m, hf_config=HFConfig(rope_scaling={"type": "yarn", "factor": 2.0}, hidden_size=64)),  # hf_overrides
        fp(m, revision="abc"),
    ]
    assert len({base, *changed}) == len(changed) + 1


def test_settings_that_do_not_change_kv_leave_it_alone(tmp_path):
    m = make_model(tmp_path / "m")
    assert fp(m, max_model_len=8192) == fp(m)


def test_a_model_whose_files_are_not_here_is_never_reused_after_a_restart():
    digest = weights_digest("some-org/some-model-that-is-not-here")
    assert digest.startswith("unresolved:some-org/some-model-that-is-not-here:")
    out = subprocess.run([sys.executable, "-c", "from kvplug.connectors.vllm.identity import weights_digest; "
                          "print(weights_digest('some-org/some-model-that-is-not-here'))"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out != digest  # another process: another digest


def test_a_single_model_file_is_digested(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"G" * 100)
    before = weights_digest(str(gguf))
    gguf.write_bytes(b"H" * 100)
    assert weights_digest(str(gguf)) != before and not before.startswith("unresolved")
