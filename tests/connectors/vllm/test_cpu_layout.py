"""The CPU-backend layout probe against vLLM's own cache-write op."""

import pytest
import torch

pytest.importorskip("vllm")
from vllm import _custom_ops as ops  # noqa: E402

from kvplug.connectors.vllm.cpu_layout import _isa, probe_block_strides  # noqa: E402
from kvplug.layout import KVLayout, paged_view  # noqa: E402


@pytest.mark.parametrize("T,H,D", [(128, 2, 64), (32, 3, 80), (128, 1, 256)])
def test_probe_finds_where_vllm_writes_k_and_v(T, H, D):
    if not hasattr(torch.ops._C, "cpu_attn_reshape_and_cache"):
        pytest.skip("this vLLM build has no CPU attention ops")
    lay = KVLayout(1, H, D, T, "bfloat16")
    strides = probe_block_strides(lay)
    cache = torch.zeros(3, H, T, 2 * D, dtype=torch.bfloat16)
    k_cache, v_cache = cache.view(3, H, 2 * T, D).chunk(2, dim=2)
    k, v = torch.randn(T, H, D).to(torch.bfloat16), torch.randn(T, H, D).to(torch.bfloat16)
    ops.cpu_attn_reshape_and_cache(k, v, k_cache, v_cache, torch.arange(T) + 2 * T, _isa(lay))  # block 2
    got = paged_view(cache, lay, strides).index_select(0, torch.tensor([2]))[0]
    assert torch.equal(got[0], k) and torch.equal(got[1], v)
