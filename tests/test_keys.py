import subprocess
import sys

from kvplug.keys import KEY_BYTES, block_key, chain_keys, fingerprint

LAYOUT = {"num_layers": 2, "num_kv_heads": 2, "head_size": 8, "block_tokens": 4, "dtype": "bfloat16"}


def test_fingerprint_changes_with_every_input():
    base = fingerprint("m", LAYOUT, "raw", 0, 1)
    assert len(base) == KEY_BYTES
    others = [
        fingerprint("m2", LAYOUT, "raw", 0, 1),
        fingerprint("m", {**LAYOUT, "block_tokens": 8}, "raw", 0, 1),
        fingerprint("m", LAYOUT, "int4h", 0, 1),
        fingerprint("m", LAYOUT, "raw", 1, 2),
        fingerprint("m", LAYOUT, "raw", 0, 2),
    ]
    assert len({base, *others}) == 6


def test_chain_is_prefix_stable_and_parent_dependent():
    root = fingerprint("m", LAYOUT, "raw")
    keys = chain_keys(root, list(range(10)), 4, partial=True)
    assert len(keys) == 3  # two full blocks + a 2-token tail
    assert chain_keys(root, list(range(8)), 4) == keys[:2]
    assert keys[1] == block_key(keys[0], [4, 5, 6, 7])
    # same tokens under another parent -> another key
    assert block_key(root, [4, 5, 6, 7]) != keys[1]


def test_keys_are_stable_across_processes():
    code = (
        "from kvplug.keys import fingerprint, chain_keys;"
        f"print(chain_keys(fingerprint('m', {LAYOUT!r}, 'raw'), list(range(9)), 4, True)[-1].hex())"
    )
    outs = {subprocess.check_output([sys.executable, "-c", code], env={"PYTHONHASHSEED": s}).strip() for s in ("1", "2")}
    assert len(outs) == 1
