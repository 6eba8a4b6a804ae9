"""``kvplug verify`` and ``kvplug stats`` on an SSD tier directory, and ``kvplug serve``'s arguments."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from kvplug.cli import main
from kvplug.cli.serve import UsageError, vllm_argv
from kvplug.tiers.ssd import SSDTier
from kvplug.tiers.slots import slot_stride

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tiers"))
from ssd_helpers import BLOCK, FP, block, content, slot  # noqa: E402

N = 6


def _store(path: Path, n: int = N, integrity_key: bytes | None = None) -> list[bytes]:
    keys = []
    with SSDTier(str(path), 64 * slot_stride(BLOCK), BLOCK, FP, o_direct="off", integrity_key=integrity_key) as t:
        parent = FP
        for i in range(n):
            key, parent, tokens = block(i, parent)
            assert t.write(key, parent, tokens, slot(fill=content(key))).result(10)
            keys.append(key)
            parent = key
    return keys


def _flip(path: Path, slot_no: int, offset: int = 100) -> None:
    seg = path / "segment-00000.kvs"
    with open(seg, "r+b") as f:
        f.seek(slot_no * slot_stride(BLOCK) + offset)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x40]))


def _report(path: Path, *args: str, capsys) -> tuple[int, dict]:
    rc = main(["verify", str(path), "--json", *args])
    return rc, json.loads(capsys.readouterr().out)


def test_verify_finds_a_flipped_byte_and_drops_it_only_when_asked(tmp_path, capsys):
    keys = _store(tmp_path / "ssd")
    rc, rep = _report(tmp_path / "ssd", capsys=capsys)
    assert (rc, rep["blocks"], rep["sound"], rep["bad"]) == (0, N, N, 0)

    _flip(tmp_path / "ssd", 2)
    rc, rep = _report(tmp_path / "ssd", capsys=capsys)
    assert (rc, rep["blocks"], rep["bad"], rep["problems"]) == (1, N, 1, {"checksum": 1})
    rc, rep = _report(tmp_path / "ssd", capsys=capsys)  # nothing was changed without --drop-bad
    assert (rc, rep["blocks"], rep["bad"]) == (1, N, 1)

    rc, rep = _report(tmp_path / "ssd", "--drop-bad", capsys=capsys)
    assert (rc, rep["dropped"]) == (1, 1)
    bad_key = bytes.fromhex(rep["bad_keys"][0])
    rc, rep = _report(tmp_path / "ssd", capsys=capsys)
    assert (rc, rep["blocks"], rep["sound"]) == (0, N - 1, N - 1)
    # the tier itself no longer has the dropped block, and still serves the others
    with SSDTier(str(tmp_path / "ssd"), 64 * slot_stride(BLOCK), BLOCK, FP, o_direct="off") as t:
        assert not t.contains(bad_key)
        other = next(k for k in keys if k != bad_key)
        out = slot()
        assert t.read(other, out).result(10)
        assert (out[:BLOCK] == content(other)).all()


def test_verify_checks_macs_with_the_key(tmp_path, capsys, monkeypatch):
    secret = b"s" * 32
    _store(tmp_path / "ssd", integrity_key=secret)
    monkeypatch.setenv("KV_SECRET", secret.decode())
    rc, rep = _report(tmp_path / "ssd", "--integrity-key", "env:KV_SECRET", capsys=capsys)
    assert (rc, rep["sound"], rep["mac_unchecked"]) == (0, N, 0)
    monkeypatch.setenv("KV_SECRET", "t" * 32)
    rc, rep = _report(tmp_path / "ssd", "--integrity-key", "env:KV_SECRET", capsys=capsys)
    assert (rc, rep["problems"]) == (1, {"mac": N})
    rc, rep = _report(tmp_path / "ssd", capsys=capsys)  # without the key: checksums only, said so
    assert (rc, rep["sound"], rep["mac_unchecked"]) == (0, N, N)


def test_verify_refuses_a_directory_in_use(tmp_path, capsys):
    _store(tmp_path / "ssd")
    with SSDTier(str(tmp_path / "ssd"), 64 * slot_stride(BLOCK), BLOCK, FP, o_direct="off"):
        assert main(["verify", str(tmp_path / "ssd")]) == 2
    assert "in use by another process" in capsys.readouterr().out


def test_stats_of_an_ssd_directory(tmp_path, capsys):
    _store(tmp_path / "ssd")
    assert main(["stats", str(tmp_path / "ssd"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["blocks"], out["block_bytes"], out["bytes"]) == (N, BLOCK, N * BLOCK)
    assert out["blocks_per_fingerprint"] == {FP.hex()[:16]: N}
    assert main(["stats", str(tmp_path / "nothing")]) == 2


@pytest.mark.parametrize("argv, expected", [
    (["m"], ["m", "--kv-connector", "kvplug"]),
    (["m", "--kvplug-codec", "int4h"], ["m", "--kvplug-codec", "int4h", "--kv-connector", "kvplug"]),
    (["m", "--kv-connector", "kvplug"], ["m", "--kv-connector", "kvplug"]),
    (["m", "--kv-transfer-config={}"], ["m", "--kv-transfer-config={}"]),
    (["m", "--kv-transfer-config", "{}"], ["m", "--kv-transfer-config", "{}"]),
    (["m", "--without-kvplug"], ["m"]),
    (["--help"], ["--help"]),
    (["--help=kvplug"], ["--help=kvplug"]),
    (["m", "--kv_transfer_config", "{}"], ["m", "--kv_transfer_config", "{}"]),
    (["m", "--kv_transfer_config={}"], ["m", "--kv_transfer_config={}"]),
    (["m", "--kv_connector=kvplug"], ["m", "--kv_connector=kvplug"]),
    (["m", "--kv-transfer-config.kv_connector", "X"], ["m", "--kv-transfer-config.kv_connector", "X"]),
    (["--model", "m"], ["--model", "m", "--kv-connector", "kvplug"]),
    (["--model=m", "--port", "1"], ["--model=m", "--port", "1", "--kv-connector", "kvplug"]),
    (["m", "--kv-transfer-configs", "x"], ["m", "--kv-transfer-configs", "x", "--kv-connector", "kvplug"]),
])
def test_serve_turns_kvplug_on_unless_told_otherwise(argv, expected):
    assert vllm_argv(argv) == expected


@pytest.mark.parametrize("yaml_text, adds_kvplug", [
    ("port: 8001\n", True),
    ("kv_transfer_config:\n  kv_connector: LMCacheMPConnector\n  kv_role: kv_both\n", False),
    ("kv-transfer-config: '{}'\n", False),
    ("kv_connector: kvplug\n", False),
])
@pytest.mark.parametrize("spelling", ["two", "equals"])
def test_serve_reads_the_config_file_for_a_connector(tmp_path, yaml_text, adds_kvplug, spelling):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml_text)
    opts = ["--config", str(cfg)] if spelling == "two" else [f"--config={cfg}"]
    assert vllm_argv(["m", *opts]) == ["m", *opts, *(["--kv-connector", "kvplug"] if adds_kvplug else [])]


def test_serve_takes_the_model_from_the_config_file(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("model: /models/m\nport: 8001\n")
    assert vllm_argv(["--config", str(cfg)]) == ["--config", str(cfg), "--kv-connector", "kvplug"]


@pytest.mark.parametrize("argv", [[], ["--port", "8000"], ["--without-kvplug"], ["--kvplug-codec", "raw"]])
def test_serve_without_a_model_is_a_usage_error(argv, capsys):
    with pytest.raises(UsageError, match="MODEL is required"):
        vllm_argv(argv)
    assert main(["serve", *argv]) == 2  # before vLLM is imported: no default-model download
    err = capsys.readouterr().err
    assert "kvplug serve: MODEL is required" in err and "usage: kvplug serve MODEL [vLLM options]" in err


def _corrupt_manifest(path: Path) -> None:
    path.mkdir(mode=0o700)
    fd = os.open(path / "manifest.sqlite3", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"this is not an SQLite database, " * 64)
    os.close(fd)


def test_verify_refuses_a_directory_without_a_manifest_and_writes_nothing(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o700)
    assert main(["verify", str(empty)]) == 2
    assert "no kvplug SSD tier here (no manifest.sqlite3); nothing checked" in capsys.readouterr().out
    assert os.listdir(empty) == []  # no LOCK file left behind
    assert main(["stats", str(empty)]) == 2
    assert "no kvplug SSD tier here" in capsys.readouterr().out


def test_a_corrupt_manifest_is_exit_2_with_a_message(tmp_path, capsys):
    _corrupt_manifest(tmp_path / "ssd")
    for argv in (["verify", str(tmp_path / "ssd")], ["stats", str(tmp_path / "ssd")]):
        assert main(argv) == 2
        out = capsys.readouterr().out
        assert "manifest.sqlite3: not a readable kvplug manifest (DatabaseError" in out, out


def test_drop_bad_says_what_it_dropped_and_exits_1(tmp_path, capsys):
    _store(tmp_path / "ssd")
    _flip(tmp_path / "ssd", 1)
    assert main(["verify", str(tmp_path / "ssd"), "--drop-bad"]) == 1  # not sound when checked
    out = capsys.readouterr().out
    assert "1 bad (checksum: 1)" in out and "bad block " in out
    assert "dropped 1 bad blocks from the manifest: the store holds only sound blocks now" in out
    assert main(["verify", str(tmp_path / "ssd")]) == 0
