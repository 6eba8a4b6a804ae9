"""The store with a real SSD tier: it hears the tier's own drops; keyed integrity end to end."""

from __future__ import annotations

import numpy as np

from kvplug.keys import block_key
from store_helpers import ROOT, STRIDE, check_bytes, make, put_chain


def test_ssd_evictions_leave_the_store_index(tmp_path):
    config = dict(ssd_path=str(tmp_path / "ssd"), ssd_bytes=4 * STRIDE, o_direct="off")
    store = make(tmp_path, cpu_blocks=2, **config)
    chains = [put_chain(store, [100 * c + i for i in range(4)]) for c in range(8)]
    store.flush()
    assert store.stats()["ssd"]["evictions"] >= 4
    gone = [k for (k,) in chains if not store.ssd.contains(k) and k not in store._resident]
    assert gone and not any(k in store for k in gone)
    store.close()


def test_integrity_key_from_env_and_mac_failure_drops(tmp_path, monkeypatch):
    monkeypatch.setenv("KV_SECRET", "s" * 32)
    config = dict(ssd_path=str(tmp_path / "ssd"), ssd_bytes=64 * STRIDE, o_direct="off", integrity_key="env:KV_SECRET")
    store = make(tmp_path, **config)
    keys = put_chain(store, list(range(12)))
    assert store.stats()["ssd"]["integrity"] == 1
    store.close()
    store = make(tmp_path, **config)
    check_bytes(store, list(range(12)), 12)
    store.close()
    monkeypatch.setenv("KV_SECRET", "t" * 32)  # another key: every block is a miss
    store = make(tmp_path, **config)
    n, _ = store.get(list(range(12)))
    assert n == 0 and store.stats()["ssd"]["corruptions_mac"] >= 1
    assert keys[0] not in store
    store.close()


def test_row_with_too_many_tokens_does_not_stop_the_store(tmp_path):
    import sqlite3
    from kvplug.tiers.manifest import Row
    config = dict(ssd_path=str(tmp_path / "ssd"), ssd_bytes=64 * STRIDE, o_direct="off")
    store = make(tmp_path, **config)
    keys = put_chain(store, list(range(8)))
    store.close()
    conn = sqlite3.connect(tmp_path / "ssd" / "manifest.sqlite3")
    cols = ", ".join(Row._fields)
    with conn:
        row = Row(*conn.execute(f"SELECT {cols} FROM blocks WHERE key = ?", (keys[0],)).fetchone())
        tokens = np.arange(50, 56, dtype="<i8")
        row = row._replace(key=block_key(ROOT, tokens), tokens=tokens.tobytes(), slot=40)
        conn.execute(f"INSERT INTO blocks ({cols}, row_check) VALUES (?,?,?,?,?,?,?,?,?,?)", row.with_check())
    conn.close()
    store = make(tmp_path, **config)
    check_bytes(store, list(range(8)), 8)
    assert store.stats()["ssd"]["corruptions_manifest_tokens"] == 1
    store.close()


def test_with_a_key_an_epoch_file_that_fails_its_mac_reaches_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("KV_SECRET", "s" * 32)
    config = dict(ssd_path=str(tmp_path / "ssd"), ssd_bytes=64 * STRIDE, o_direct="off", integrity_key="env:KV_SECRET")
    store = make(tmp_path, **config)
    store.reset()  # (request roots hold the epoch: connectors/vllm/identity.py)
    epoch_now = store.epoch
    store.close()
    path = tmp_path / "ssd" / "EPOCH"
    assert len(path.read_text().split()) == 2  # the epoch and its MAC
    store = make(tmp_path, **config)
    assert store.epoch == epoch_now  # a restart keeps the signed epoch
    store.close()
    path.write_text(bytes(16).hex() + "\n" + path.read_text().split()[1] + "\n")  # an edited epoch
    store = make(tmp_path, **config)
    fresh = store.epoch
    assert fresh not in (epoch_now, bytes(16), b"")  # a fresh one: nothing stored before is reachable
    store.close()
    store = make(tmp_path, **config)
    assert store.epoch == fresh  # written, signed: the next restart keeps it
    store.close()
    path.write_text(epoch_now.hex() + "\n")  # the right epoch, without its MAC
    store = make(tmp_path, **config)
    assert store.epoch not in (epoch_now, b"")
    store.close()
