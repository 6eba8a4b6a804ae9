"""LayerPipeline on a GPU: slab <-> paged KV bandwidth per transport, and layer-wise overlap.

Real-model shape: 16-token blocks, 8 KV heads, head 128, bf16, 32 layers;
256 blocks (4k tokens) at random ids of a 1024-block cache, to / from slots of
a pinned CPUTier slab, either at random or consecutive (a fresh store hands
out consecutive slots; a churned one scatters them).

(1) Ceiling: plain torch copies of one contiguous buffer of the same bf16 bytes,
    pinned host (torch's allocator and the CPUTier slab) <-> device.
    Pipeline: all 32 layers saved (save_layer x 32 + finish_saves) and loaded
    (start_load + finish_load), wall clock, per transport; GB/s of encoded
    bytes moved and of bf16 KV handled (the same for raw).
(2) Overlap: a fake forward of 32 layers, each a fixed bf16 GEMM on the compute
    stream after wait_layer(l), sized so that the forward takes about as long as
    the ceiling copy of the load's bytes. Forward alone, load alone, load then
    forward (serial) and both at once (pipelined);
    efficiency = (serial - pipelined) / min(load, forward).

Writes bench/results/transfer_<device>.json. Skips without CUDA.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

L, T, H, D = 32, 16, 8, 128
N, NB_CACHE, NUM_SLOTS = 256, 1024, 512
# label -> LayerPipeline keywords (+ "align": the load staging row pitch). batch/N: N layers a
# copy; /caller: copies issued on the caller's thread instead of the pipeline's worker thread.
VARIANTS = {
    "raw": {"batch/1": {"transport": "batch", "layers_per_copy": 1},
            "batch/1/caller": {"transport": "batch", "layers_per_copy": 1, "issue": "caller"},
            "runs/1": {"transport": "runs", "layers_per_copy": 1},
            "rows/1": {"transport": "rows", "layers_per_copy": 1},
            "uva/1": {"transport": "uva"},
            "host/1": {"transport": "host", "layers_per_copy": 1}},
    "int4h": {"batch/4": {"transport": "batch", "layers_per_copy": 4},
              "batch/4/caller": {"transport": "batch", "layers_per_copy": 4, "issue": "caller"},
              "batch/4/align64k": {"transport": "batch", "layers_per_copy": 4, "align": 64 << 10},
              "batch/8": {"transport": "batch", "layers_per_copy": 8},
              "batch/1": {"transport": "batch", "layers_per_copy": 1},
              "runs/4": {"transport": "runs", "layers_per_copy": 4},
              "rows/4": {"transport": "rows", "layers_per_copy": 4},
              "uva/1": {"transport": "uva"},
              "host/4": {"transport": "host", "layers_per_copy": 4}},
}
REPS = 7
RESULTS = Path(__file__).parent / "results"
_out: dict = {"transports": {}, "overlap": {}}


def _wall(fn, reps=REPS, warmup=1) -> float:
    """Median wall seconds of fn() between device syncs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@pytest.fixture(scope="module")
def env():
    from kvplug.codec import get_codec
    from kvplug.layout import KVLayout, paged_view
    from kvplug.tiers.cpu import CPUTier
    from kvplug.tiers.slots import slot_stride

    torch.manual_seed(0)
    lay = KVLayout(L, H, D, T, "bfloat16")
    caches = [torch.randn(NB_CACHE, 2, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(L)]
    views = [paged_view(c, lay) for c in caches]
    perm = torch.randperm(NB_CACHE).tolist()
    src_ids, dst_ids = perm[:N], perm[N:2 * N]
    codecs = {name: get_codec(name, lay) for name in ("raw", "int4h")}
    slabs = {name: CPUTier.create(NUM_SLOTS * slot_stride(c.block_bytes), c.block_bytes, pin=True)
             for name, c in codecs.items()}
    assert all(s.pinned for s in slabs.values()), "the CPUTier slab could not be pinned"
    patterns = {"random": torch.randperm(NUM_SLOTS)[:N].tolist(), "consecutive": list(range(N))}
    yield {"lay": lay, "views": views, "src": src_ids, "dst": dst_ids, "codecs": codecs, "slabs": slabs,
           "patterns": patterns}
    for s in slabs.values():
        s.close()
    _write()


def test_ceiling(env):
    nbytes = N * L * env["codecs"]["raw"].layer_bytes
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    slab = env["slabs"]["raw"].buffer.view(-1)[:nbytes]
    out = {"bytes": nbytes}
    for name, buf in (("pinned", host), ("slab", slab)):
        out[f"h2d_{name}_gbps"] = round(nbytes / _wall(lambda b=buf: dev.copy_(b, non_blocking=True)) / 1e9, 1)
        out[f"d2h_{name}_gbps"] = round(nbytes / _wall(lambda b=buf: b.copy_(dev, non_blocking=True)) / 1e9, 1)
    _out["ceiling"] = out
    print(out)


def _pipe(env, codec_name, kw):
    from kvplug import transfer

    kw, default = dict(kw), transfer.STAGE_ROW_ALIGN
    transfer.STAGE_ROW_ALIGN = kw.pop("align", 1)  # unless a variant says so: dense staging rows
    try:
        return transfer.LayerPipeline(env["codecs"][codec_name], env["views"], env["slabs"][codec_name].buffer, **kw)
    finally:
        transfer.STAGE_ROW_ALIGN = default


def _transport_run(env, codec_name, kw, saves, loads) -> dict:
    codec = env["codecs"][codec_name]
    enc, bf16 = N * L * codec.layer_bytes, N * L * env["lay"].raw_layer_bytes()
    pipe = _pipe(env, codec_name, kw)
    host = []

    def save():
        for layer in range(L):
            pipe.save_layer(layer, saves)
        assert pipe.finish_saves() == [], "blocks failed to save"

    def load():
        t0 = time.perf_counter()
        pipe.start_load(loads)
        host.append(time.perf_counter() - t0)
        assert pipe.finish_load() == [], "blocks failed to load"

    try:
        t_save, t_load = _wall(save), _wall(load)
    finally:
        pipe.close()
    if codec_name == "raw":  # what was loaded is what was saved, bit for bit
        for layer in (0, L - 1):
            v = env["views"][layer]
            src, dst = [b for b, _ in saves], [b for b, _, _ in loads]
            assert torch.equal(v[dst].view(torch.int16), v[src].view(torch.int16)), "raw round trip differs"
    entry = {"save_gbps": round(enc / t_save / 1e9, 1), "load_gbps": round(enc / t_load / 1e9, 1),
             "save_ms": round(t_save * 1e3, 2), "load_ms": round(t_load * 1e3, 2),
             "start_load_host_ms": round(statistics.median(host) * 1e3, 2)}
    if codec_name != "raw":
        entry.update(save_bf16_gbps=round(bf16 / t_save / 1e9, 1), load_bf16_gbps=round(bf16 / t_load / 1e9, 1))
    return entry


@pytest.mark.parametrize("codec_name", ["raw", "int4h"])
def test_transports(env, codec_name):
    codec = env["codecs"][codec_name]
    res = _out["transports"].setdefault(codec_name, {})
    res["bytes_encoded"] = N * L * codec.layer_bytes
    res["bytes_bf16"] = N * L * env["lay"].raw_layer_bytes()
    for pattern, slots in env["patterns"].items():
        saves = list(zip(env["src"], slots))
        loads = [(b, s, T) for b, s in zip(env["dst"], slots)]
        for label, kw in VARIANTS[codec_name].items():
            try:
                entry = _transport_run(env, codec_name, kw, saves, loads)
            except Exception as e:  # noqa: BLE001 - not available or broken here: say why, measure the rest
                entry = {"error": f"{type(e).__name__}: {e}"}
            res.setdefault(pattern, {})[label] = entry
            print(codec_name, pattern, label, entry)


def _overlap_run(env, codec_name, kw, gemm, reps, saves, loads) -> dict:
    x, w, y = gemm
    pipe = _pipe(env, codec_name, kw)
    try:
        for layer in range(L):  # the slots hold this codec's bytes
            pipe.save_layer(layer, saves)
        pipe.finish_saves()

        def forward():
            for layer in range(L):
                pipe.wait_layer(layer)
                for _ in range(reps):
                    torch.mm(x, w, out=y)

        def load_only():
            pipe.start_load(loads)
            pipe.finish_load()

        def serial():
            pipe.start_load(loads)
            pipe.finish_load()
            forward()

        host = []

        def pipelined():
            t0 = time.perf_counter()
            pipe.start_load(loads)
            forward()
            host.append(time.perf_counter() - t0)  # the caller's thread: issuing the load and the forward
            pipe.finish_load()

        t_fwd, t_load, t_serial, t_pipe = _wall(forward), _wall(load_only), _wall(serial), _wall(pipelined)
    finally:
        pipe.close()
    return {"forward_ms": round(t_fwd * 1e3, 2), "load_ms": round(t_load * 1e3, 2),
            "serial_ms": round(t_serial * 1e3, 2), "pipelined_ms": round(t_pipe * 1e3, 2),
            "efficiency": round((t_serial - t_pipe) / min(t_load, t_fwd), 3),
            "pipelined_issue_host_ms": round(statistics.median(host) * 1e3, 2)}


@pytest.mark.parametrize("codec_name", ["raw", "int4h"])
def test_overlap(env, codec_name):
    codec = env["codecs"][codec_name]
    enc = N * L * codec.layer_bytes
    ceiling = _out.get("ceiling", {}).get("h2d_slab_gbps", 50.0)
    target_layer = enc / (ceiling * 1e9) / L  # seconds of forward per layer: as long as the ideal load
    x = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(1024, 4096, device="cuda", dtype=torch.bfloat16)
    t_gemm = _wall(lambda: [torch.mm(x, w, out=y) for _ in range(50)]) / 50
    reps = max(1, round(target_layer / t_gemm))
    slots = env["patterns"]["random"]
    saves = list(zip(env["src"], slots))
    loads = [(b, s, T) for b, s in zip(env["dst"], slots)]
    res = _out["overlap"].setdefault(codec_name, {})
    res.update(gemm="bf16 [1024x4096] @ [4096x4096]", gemms_per_layer=reps, gemm_ms=round(t_gemm * 1e3, 4),
               slots="random")
    for label, kw in VARIANTS[codec_name].items():
        try:
            res[label] = _overlap_run(env, codec_name, kw, (x, w, y), reps, saves, loads)
        except Exception as e:  # noqa: BLE001
            res[label] = {"error": f"{type(e).__name__}: {e}"}
        print(codec_name, label, res[label])


def _write():
    import triton

    from kvplug.transfer import LayerPipeline
    from kvplug.transfer_movers import cudart

    name = torch.cuda.get_device_name()
    _out.update(device=name, torch=torch.__version__, triton=triton.__version__,
                cuda_runtime=cudart().version,
                shape={"layers": L, "block_tokens": T, "kv_heads": H, "head_size": D, "dtype": "bfloat16",
                       "blocks": N, "cache_blocks": NB_CACHE, "slab_slots": NUM_SLOTS},
                note=f"wall clock between device syncs, median of {REPS}; GB/s = encoded bytes (and bf16 KV for "
                     "int4h) over the time to move all 32 layers; staging 64 MiB per direction (the default)")
    try:
        from kvplug.codec import get_codec
        from kvplug.layout import KVLayout

        lay = KVLayout(1, 1, 8, 1)
        probe = torch.empty(1, 2 * 8 * 2 * 2, dtype=torch.uint8)
        probe = probe.pin_memory()
        _out["auto"] = LayerPipeline(get_codec("raw", lay), [torch.zeros(1, 2, 1, 1, 8, device="cuda",
                                                                          dtype=torch.bfloat16)], probe).transport
    except Exception as e:  # noqa: BLE001
        _out["auto"] = f"{type(e).__name__}: {e}"
    RESULTS.mkdir(exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    (RESULTS / f"transfer_{slug}.json").write_text(json.dumps(_out, indent=2) + "\n")
