"""Codec API on CPU (the torch reference path); the kernels are tested in tests/triton_kernels."""

import pytest
import torch

from kvplug import codec_reference as ref
from kvplug.codec import CODECS, get_codec
from kvplug.layout import BlockStrides, KVLayout, paged_view

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def paged(kind, nb, lay, seed=0):
    """One layer's paged KV in a vLLM physical layout, and its uniform view."""
    g = torch.Generator().manual_seed(seed)
    t, h, d = lay.block_tokens, lay.num_kv_heads, lay.head_size
    shape = {"2_nb": (2, nb, t, h, d), "nb_2": (nb, 2, t, h, d), "cpu_packed": (nb, h, t, 2 * d),
             "nb_2_hnd": (nb, 2, h, t, d), "gpu_nhd": (nb, t, h, 2 * d)}[kind]
    kv = torch.randn(shape, generator=g).to(lay.torch_dtype)
    if kind == "nb_2_hnd":
        kv = kv.permute(0, 1, 3, 2, 4)
    if kind == "gpu_nhd":  # vLLM's [B, H, N, 2D] view of its default LBNHC layout
        kv = kv.transpose(1, 2)
    return kv, paged_view(kv, lay, BlockStrides.plain(t, h, d) if kind == "cpu_packed" else None)


def test_sizes_and_compression():
    lay = KVLayout(32, 8, 128, 16, "bfloat16")
    raw, q = get_codec("raw", lay), get_codec("int4h", lay)
    assert raw.layer_bytes == 2 * 16 * 8 * 128 * 2 and raw.block_bytes == 32 * raw.layer_bytes
    assert q.layer_bytes == 2 * 16 * 8 * (64 + 4) and q.block_bytes == 32 * q.layer_bytes
    assert raw.layer_bytes / q.layer_bytes >= 3.7
    assert get_codec("int4h", lay, 32).layer_bytes == 2 * 16 * 8 * (64 + 16)
    assert q.describe() == {"name": "int4h", "format_version": 1, "group": 128, "hadamard_block": 128}


def test_bad_arguments():
    lay = KVLayout(2, 2, 80, 4)
    with pytest.raises(ValueError, match="expected one of"):
        get_codec("zstd", lay)
    with pytest.raises(ValueError, match="power of two"):
        get_codec("int4h", lay, 24)
    with pytest.raises(ValueError, match="no group"):
        get_codec("raw", lay, 16)
    codec = get_codec("int4h", lay)
    kv, view = paged("nb_2", 3, lay)
    with pytest.raises(ValueError, match="paged view"):
        codec.encode(kv[:, 0], [0], torch.zeros(1, codec.layer_bytes, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        codec.encode(view, [0, 1], torch.zeros(1, codec.layer_bytes, dtype=torch.uint8))
    with pytest.raises(IndexError):
        codec.encode(view, [3], torch.zeros(1, codec.layer_bytes, dtype=torch.uint8))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("kind", ["2_nb", "nb_2", "cpu_packed", "nb_2_hnd", "gpu_nhd"])
def test_raw_round_trip_bit_exact(kind, dtype):
    lay = KVLayout(2, 2, 64, 8, dtype)
    codec = get_codec("raw", lay)
    kv, view = paged(kind, 6, lay)
    view.view(torch.uint8)[0, 0, 0, 0, :4] = 0xFF  # a NaN with a payload
    ids = torch.tensor([5, 2, 0])
    buf = torch.zeros(3, codec.layer_bytes, dtype=torch.uint8)
    codec.encode(view, ids, buf)
    assert torch.equal(buf[0].view(lay.torch_dtype).view(2, 8, 2, 64).view(torch.uint8),
                       view[5].contiguous().view(torch.uint8))
    kv2, view2 = paged(kind, 6, lay, seed=1)
    before = view2.clone()
    codec.decode(buf, view2, ids)
    assert torch.equal(view2[ids].view(torch.uint8), view[ids].view(torch.uint8))
    assert torch.equal(view2[[1, 3, 4]].view(torch.uint8), before[[1, 3, 4]].view(torch.uint8))


@pytest.mark.parametrize("d,group", [(64, 0), (80, 0), (128, 0), (128, 32), (256, 0)])
@pytest.mark.parametrize("kind", ["nb_2", "cpu_packed", "gpu_nhd"])
def test_int4h_round_trip_error(kind, d, group):
    lay = KVLayout(2, 2, d, 4)
    codec = get_codec("int4h", lay, group)
    kv, view = paged(kind, 4, lay)
    buf = torch.zeros(4, codec.layer_bytes, dtype=torch.uint8)
    codec.encode(view, [3, 2, 1, 0], buf)
    _, out = paged(kind, 4, lay, seed=1)
    codec.decode(buf, out, [3, 2, 1, 0])
    err = (out.float() - view.float()).norm() / view.float().norm()
    assert 0.03 < err < 0.12


def test_chunks_and_strided_slab_rows(monkeypatch):
    lay = KVLayout(3, 2, 64, 4)
    codec = get_codec("int4h", lay)
    _, view = paged("2_nb", 9, lay)
    ids = torch.tensor([8, 0, 3, 5, 1, 7, 2])
    whole = torch.zeros(7, codec.layer_bytes, dtype=torch.uint8)
    codec.encode(view, ids, whole)
    monkeypatch.setattr(ref, "CHUNK_ELEMS", 2 * 2 * 4 * 2 * 64)  # two blocks a chunk
    slab = torch.zeros(7, codec.block_bytes, dtype=torch.uint8)  # layer 1 of each slot
    rows = slab[:, codec.layer_bytes : 2 * codec.layer_bytes]
    codec.encode(view, ids, rows)
    assert torch.equal(rows, whole) and not slab[:, : codec.layer_bytes].any()
    _, a = paged("2_nb", 9, lay, seed=2)
    _, b = paged("2_nb", 9, lay, seed=2)
    codec.decode(rows, a, ids)
    monkeypatch.setattr(ref, "CHUNK_ELEMS", 1 << 22)
    codec.decode(whole, b, ids)
    assert torch.equal(a, b)


def test_empty_block_list():
    lay = KVLayout(1, 2, 64, 4)
    _, view = paged("nb_2", 2, lay)
    before = view.clone()
    for name in ("raw", "int4h"):
        codec = get_codec(name, lay)
        codec.encode(view, [], torch.empty(0, codec.layer_bytes, dtype=torch.uint8))
        codec.decode(torch.empty(0, codec.layer_bytes, dtype=torch.uint8), view, torch.tensor([], dtype=torch.long))
    assert torch.equal(view, before)


def test_non_finite_poisons_only_its_hadamard_block():
    lay = KVLayout(1, 2, 128, 4, "float16")
    codec = get_codec("int4h", lay, 32)
    _, view = paged("nb_2", 2, lay)
    view[1, 0, 2, 1, 9] = float("inf")
    view[1, 1, 0, 0, 100] = float("nan")
    buf = torch.zeros(1, codec.layer_bytes, dtype=torch.uint8)
    codec.encode(view, [1], buf)
    _, out = paged("nb_2", 2, lay, seed=1)
    codec.decode(buf, out, [1])
    nan = out[1].isnan()
    assert nan[0, 2, 1].all() and nan[1, 0, 0].all() and nan.sum() == 2 * 128  # Hadamard block = head
    assert not torch.isinf(out).any()
    fin = ~nan
    assert ((out[1].float() - view[1].float())[fin].norm() / view[1].float()[fin].norm()) < 0.12


def test_int4kc_sizes_and_compression():
    def ratio(t, d):
        lay = KVLayout(1, 8, d, t, "bfloat16")
        return get_codec("raw", lay).layer_bytes / get_codec("int4kc", lay).layer_bytes

    lay = KVLayout(2, 8, 128, 128, "bfloat16")
    q = get_codec("int4kc", lay)
    assert q.layer_bytes == 128 * 8 * 128 + 4 * 8 * 128 + 4 * 128 * 8  # codes, K per channel, V per token
    assert ratio(128, 128) >= 3.7 and ratio(256, 256) >= 3.8 and ratio(16, 128) < 3.2  # per-block cost
    assert q.describe() == {"name": "int4kc", "format_version": 1, "key_group": "block", "value_group": 128,
                            "value_hadamard_block": 128}
    with pytest.raises(ValueError, match="even head_size"):
        get_codec("int4kc", KVLayout(1, 2, 63, 4))


@pytest.mark.parametrize("kind", ["nb_2", "cpu_packed", "gpu_nhd"])
def test_int4kc_round_trip_keeps_key_offsets(kind):
    lay = KVLayout(1, 2, 64, 16)
    codec = get_codec("int4kc", lay)
    kv, view = paged(kind, 3, lay)
    view[:, 0, :, :, 5] += 300.0  # a key bias: int4h's per-token code loses the rest to it
    ids = [2, 0]
    buf = torch.zeros(2, codec.layer_bytes, dtype=torch.uint8)
    codec.encode(view, ids, buf)
    _, out = paged(kind, 3, lay, seed=1)
    codec.decode(buf, out, ids)
    others = [c for c in range(64) if c != 5]

    def key_error(decoded):  # over the unbiased channels, relative to their own norm
        return ((decoded[ids, 0] - view[ids, 0]).float()[..., others].norm()
                / view[ids, 0].float()[..., others].norm())

    assert 0.03 < key_error(out) < 0.1  # 4-bit over 16 tokens of each channel
    h = get_codec("int4h", lay)
    hbuf = torch.zeros(2, h.layer_bytes, dtype=torch.uint8)
    h.encode(view, ids, hbuf)
    _, hout = paged(kind, 3, lay, seed=1)
    h.decode(hbuf, hout, ids)
    assert key_error(hout) > 0.5  # the per-token code spends its levels on the bias
    v_err = (out[ids, 1] - view[ids, 1]).float().norm() / view[ids, 1].float().norm()
    assert 0.03 < v_err < 0.12


def test_int4kc_chunks_match_one_pass(monkeypatch):
    lay = KVLayout(1, 2, 64, 4)
    codec = get_codec("int4kc", lay)
    _, view = paged("2_nb", 9, lay)
    ids = torch.tensor([8, 0, 3, 5, 1, 7, 2])
    whole = torch.zeros(7, codec.layer_bytes, dtype=torch.uint8)
    codec.encode(view, ids, whole)
    monkeypatch.setattr(ref, "CHUNK_ELEMS", 2 * 2 * 4 * 2 * 64)  # two blocks a chunk
    chunked = torch.zeros_like(whole)
    codec.encode(view, ids, chunked)
    assert torch.equal(chunked, whole)
    _, a = paged("2_nb", 9, lay, seed=2)
    _, b = paged("2_nb", 9, lay, seed=2)
    codec.decode(chunked, a, ids)
    monkeypatch.setattr(ref, "CHUNK_ELEMS", 1 << 22)
    codec.decode(whole, b, ids)
    assert torch.equal(a, b)


def test_int4kcs_sizes_format_and_exact_sink():
    def ratio(t, d):
        lay = KVLayout(1, 8, d, t, "bfloat16")
        return get_codec("raw", lay).layer_bytes / get_codec("int4kcs", lay).layer_bytes

    lay = KVLayout(1, 2, 64, 16)
    q = get_codec("int4kcs", lay)
    assert q.layer_bytes == get_codec("int4kc", lay).layer_bytes + 2 * 64 * 2  # + token 0's K, bf16 [H, D]
    assert ratio(128, 128) >= 3.7 and ratio(128, 256) >= 3.75  # the goal: >= 3.7x at head 128
    assert q.describe()["name"] == "int4kcs" and q.describe() != get_codec("int4kc", lay).describe()
    from kvplug.tiers.remote_record import CODECS as REMOTE_CODECS
    assert set(REMOTE_CODECS) == set(CODECS)  # every codec has its id on the wire
    with pytest.raises(ValueError, match="block_tokens >= 2"):
        get_codec("int4kcs", KVLayout(1, 2, 64, 1))
    _, view = paged("cpu_packed", 3, lay)
    view[:, 0, 0, :, :4] *= 300.0  # sink keys far out in a few channels
    buf = torch.zeros(2, q.layer_bytes, dtype=torch.uint8)
    q.encode(view, [2, 0], buf)
    _, out = paged("cpu_packed", 3, lay, seed=1)
    q.decode(buf, out, [2, 0])
    assert torch.equal(out[[2, 0], 0, 0], view[[2, 0], 0, 0])  # the sink, bit for bit
    rest = (out[[2, 0], 0, 1:] - view[[2, 0], 0, 1:]).float().norm() / view[[2, 0], 0, 1:].float().norm()
    assert rest < 0.1  # the other 15 tokens keep their own channel ranges
