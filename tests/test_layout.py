import pytest
import torch

from kvplug.layout import KVLayout, layout_from_paged, paged_view

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
    assert torch.equal(paged_view(kv, L), ref)
    k_cache, v_cache = kv.view(NB, 3, 10, 4).chunk(2, dim=2)  # exactly what vLLM attends over
    assert torch.equal(k_cache, ref[:, 0].permute(0, 2, 1, 3))
    assert torch.equal(v_cache, ref[:, 1].permute(0, 2, 1, 3))
    view = paged_view(kv, L)
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
