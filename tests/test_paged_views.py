"""vLLM's 4-D GPU KV views through kvplug.paged_views (built here by hand; with vLLM's own
allocator in tests/connectors/vllm/test_gpu_layouts.py)."""

import pytest
import torch

from kvplug.layout import BlockStrides, KVLayout, SplitKV, _dense_blocks, copy_tokens, gather_blocks, paged_view, scatter_blocks
from kvplug.paged_views import KV_PLANES

L, NB, H, T, D = 3, 5, 2, 4, 8
LAY = KVLayout(num_layers=L, num_kv_heads=H, head_size=D, block_tokens=T, dtype="float32")
# KVCacheLayout's physical order of the logical [L, B, H, N, C] axes
ORDERS = {"LBHNC": (0, 1, 2, 3, 4), "LBNHC": (0, 1, 3, 2, 4), "LHBNC": (0, 2, 1, 3, 4),
          "BLHNC": (1, 0, 2, 3, 4), "BLNHC": (1, 0, 3, 2, 4), "BHLNC": (1, 2, 0, 3, 4)}


def layer_view(order, layer=1, shape=(L, NB, H, T, 2 * D)):
    """Layer ``layer`` of a [L, B, H, N, C] cache stored in ``order``: a [B, H, N, C] view."""
    phys = torch.randn([shape[i] for i in order])
    return phys.permute([order.index(i) for i in range(5)])[layer]


def backend_kv(kv):
    """K and V [B, T, H, D] as vLLM's GPU backends split the view."""
    return kv.transpose(1, 2).split(D, dim=-1)


@pytest.mark.parametrize("name", list(ORDERS))
def test_every_layout_reads_as_the_backends_split(name):
    kv = layer_view(ORDERS[name])
    view = paged_view(kv, LAY)
    k, v = backend_kv(kv)
    assert view.shape == (NB, 2, T, H, D) and view.data_ptr() == kv.data_ptr()
    assert torch.equal(view[:, 0], k) and torch.equal(view[:, 1], v)
    ids = torch.tensor([4, 1, 2])
    assert torch.equal(gather_blocks(view, ids), torch.stack([k, v], 1)[ids])
    new = torch.randn(3, 2, T, H, D)
    scatter_blocks(view, ids, new)
    assert torch.equal(k[ids], new[:, 0]) and torch.equal(v[ids], new[:, 1])
    before = torch.stack([k, v], 1).clone()
    copy_tokens(view, 3, new[0], 3)  # the first 3 tokens of block 3, nothing else
    after = torch.stack([k, v], 1)
    assert torch.equal(after[3, :, :3], new[0, :, :3]) and torch.equal(after[3, :, 3:], before[3, :, 3:])
    assert torch.equal(after[[0, 1, 2, 4]], before[[0, 1, 2, 4]])


@pytest.mark.parametrize("name,dense", [("LBNHC", "rows"), ("BLNHC", "gapped"), ("LHBNC", None), ("BHLNC", None)])
def test_whole_block_copies_only_where_a_block_is_one_run(name, dense):
    view = paged_view(layer_view(ORDERS[name]), LAY)
    rows = _dense_blocks(view)
    if dense is None:  # heads before blocks: a block is H separate runs
        assert rows is None
        return
    page = 2 * T * H * D
    assert rows.shape == (NB, page) and rows.stride(0) == (page if dense == "rows" else L * page)


def test_kernel_blocks_read_as_manager_blocks_when_adjacent():
    # vLLM's LBNHC with a 4-token manager block split into 2 kernel blocks of 2 tokens:
    # rows b*2 and b*2+1 hold tokens 0-1 and 2-3 of manager block b
    kernel = torch.randn(NB * T, H, 2 * D).view(NB * 2, 2, H, 2 * D).transpose(1, 2)  # [B*2, H, 2, 2D]
    view = paged_view(kernel, LAY)
    k, v = backend_kv(kernel)
    assert view.shape == (NB, 2, T, H, D)
    assert torch.equal(view[:, 0], k.reshape(NB, T, H, D)) and torch.equal(view[:, 1], v.reshape(NB, T, H, D))


def test_kernel_blocks_of_a_head_major_layout_are_refused():
    # LBHNC split: each kernel block holds every head of its 2 tokens, so a manager block's
    # 4 tokens are no single strided axis
    kernel = torch.randn(NB * 2, H, 2, 2 * D)
    with pytest.raises(ValueError, match=r"2 kernel blocks of 2 tokens.*--block-size 2.*LBNHC"):
        paged_view(kernel, LAY)
    one_head = KVLayout(1, 1, D, T, "float32")  # one head: kernel blocks are adjacent again
    kernel = torch.randn(NB * 2, 1, 2, 2 * D)
    assert torch.equal(paged_view(kernel, one_head)[:, 0], backend_kv(kernel)[0].reshape(NB, T, 1, D))


@pytest.mark.parametrize("name", ["LBHNC", "BLNHC"])
def test_kv_planes(name):
    # b12x: [B, 2, N, H*D], K = kv[:, 0], V = kv[:, 1], heads packed in the last dim
    kv = layer_view(ORDERS[name], shape=(L, NB, 2, T, H * D))
    view = paged_view(kv, LAY, kv_format=KV_PLANES)
    k, v = (t.unflatten(-1, (H, D)) for t in kv.unbind(1))
    assert torch.equal(view[:, 0], k) and torch.equal(view[:, 1], v)


def test_refusals_name_the_shape_and_strides_and_what_would_be_read():
    kv = torch.zeros(NB, H, T, D)  # C = D: no room for V
    with pytest.raises(ValueError) as err:
        paged_view(kv, LAY)
    msg = str(err.value)
    assert f"unrecognised paged KV shape {(NB, H, T, D)} (strides {kv.stride()})" in msg
    expected = msg.split("expected", 1)[1]
    assert f"(blocks, {H}, {T}, {2 * D})" in expected and f"{H}, {T}, {D})" not in expected
    with pytest.raises(ValueError, match="kv_format='nhd' is not supported"):
        paged_view(torch.zeros(NB, H, T, 2 * D), LAY, kv_format="nhd")


def test_cpu_rule_refuses_a_gpu_view():
    # vLLM's CPU backend keeps each block in one run: cpu_strides cannot place K and V in LBNHC
    kv = layer_view(ORDERS["LBNHC"])
    with pytest.raises(ValueError, match=r"not one contiguous run per block.*read without cpu_strides"):
        paged_view(kv, LAY, BlockStrides.plain(T, H, D))
    dense = torch.randn(NB, H, T, 2 * D)  # the same shape, the CPU backend's: read its way when asked
    view = paged_view(dense, LAY, BlockStrides.plain(T, H, D))
    assert not isinstance(view, SplitKV)
    k_cache = dense.view(NB, H, 2 * T, D)[:, :, :T]  # as cpu_attn.py splits it
    assert torch.equal(view[:, 0], k_cache.transpose(1, 2))
