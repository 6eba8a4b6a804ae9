"""Kernel throughput on a GPU: int4h and int4kc encode/decode and raw gather beside a plain copy.

Real-model shape, one layer: 16-token blocks, 8 KV heads, head 128, bf16,
4096 of 8192 cache blocks in random order. Throughput counts the bf16 KV
bytes handled (what a copy of the same blocks moves), so ratio = op / copy.
Writes bench/results/kernels_<device>.json. Skips without CUDA.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels)")

NB_CACHE, N, T, H, D = 8192, 4096, 16, 8, 128
RESULTS = Path(__file__).parent / "results"
_measured: dict[str, float] = {}


@pytest.fixture(scope="module")
def setup():
    from kvplug.codec import get_codec
    from kvplug.layout import KVLayout, paged_view

    lay = KVLayout(1, H, D, T, "bfloat16")
    kv = torch.randn(NB_CACHE, 2, T, H, D, device="cuda", dtype=torch.bfloat16)
    view = paged_view(kv, lay)
    ids = torch.randperm(NB_CACHE, device="cuda")[:N]
    int4h, raw = get_codec("int4h", lay), get_codec("raw", lay)
    enc = torch.empty(N, int4h.layer_bytes, dtype=torch.uint8, device="cuda")
    rawbuf = torch.empty(N, raw.layer_bytes, dtype=torch.uint8, device="cuda")
    int4h.encode(view, ids, enc)
    int4kc = get_codec("int4kc", lay)
    enc_kc = torch.empty(N, int4kc.layer_bytes, dtype=torch.uint8, device="cuda")
    int4kc.encode(view, ids, enc_kc)
    yield dict(view=view, ids=ids, int4h=int4h, raw=raw, enc=enc, rawbuf=rawbuf, int4kc=int4kc, enc_kc=enc_kc,
               src=torch.randn(N * raw.layer_bytes // 2, device="cuda", dtype=torch.bfloat16))
    _write_results()


def _gbps(benchmark, name, fn, nbytes):
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    ms = do_bench(fn, warmup=25, rep=200, return_mode="median")  # CUDA events, L2 flushed per rep
    _measured[name] = nbytes / (ms * 1e-3) / 1e9
    benchmark.extra_info["gbps"] = round(_measured[name], 1)
    benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=20, warmup_rounds=2)


def test_copy(benchmark, setup):
    src = setup["src"]
    dst = torch.empty_like(src)
    _gbps(benchmark, "copy", lambda: dst.copy_(src), src.numel() * 2)


def test_encode(benchmark, setup):
    s = setup
    _gbps(benchmark, "encode", lambda: s["int4h"].encode(s["view"], s["ids"], s["enc"]), N * s["raw"].layer_bytes)


def test_decode(benchmark, setup):
    s = setup
    _gbps(benchmark, "decode", lambda: s["int4h"].decode(s["enc"], s["view"], s["ids"]), N * s["raw"].layer_bytes)


def test_int4kc_encode(benchmark, setup):
    s = setup
    _gbps(benchmark, "int4kc_encode", lambda: s["int4kc"].encode(s["view"], s["ids"], s["enc_kc"]),
          N * s["raw"].layer_bytes)


def test_int4kc_decode(benchmark, setup):
    s = setup
    _gbps(benchmark, "int4kc_decode", lambda: s["int4kc"].decode(s["enc_kc"], s["view"], s["ids"]),
          N * s["raw"].layer_bytes)


def test_raw_gather(benchmark, setup):
    s = setup
    _gbps(benchmark, "raw_gather", lambda: s["raw"].encode(s["view"], s["ids"], s["rawbuf"]), N * s["raw"].layer_bytes)


def test_raw_scatter(benchmark, setup):
    s = setup
    _gbps(benchmark, "raw_scatter", lambda: s["raw"].decode(s["rawbuf"], s["view"], s["ids"]), N * s["raw"].layer_bytes)


def _write_results():
    if "copy" not in _measured:
        return
    name = torch.cuda.get_device_name()
    copy = _measured["copy"]
    out = {"device": name, "torch": torch.__version__,
           "shape": {"blocks": N, "cache_blocks": NB_CACHE, "block_tokens": T, "kv_heads": H, "head_size": D,
                     "dtype": "bfloat16", "bytes_per_op": N * 2 * T * H * D * 2},
           "note": "GB/s of bf16 KV handled (same bytes as the copy); copy = device-to-device copy_ of those bytes",
           "copy_gbps": round(copy, 1)}
    for k in ("encode", "decode", "int4kc_encode", "int4kc_decode", "raw_gather", "raw_scatter"):
        if k in _measured:
            out[f"{k}_gbps"] = round(_measured[k], 1)
            out[f"{k}_ratio"] = round(_measured[k] / copy, 3)
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    RESULTS.mkdir(exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    (RESULTS / f"kernels_{slug}.json").write_text(json.dumps(out, indent=2) + "\n")
