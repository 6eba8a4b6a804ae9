"""Per-layer KV views exactly as vLLM 0.32's GPU runner builds them, on any device.

The KV cache config comes from vLLM's ``get_kv_cache_config_from_groups`` (the
layer and block strides of each KVCacheLayout), the tensors from its
``allocate_kv_cache`` (one backing buffer, ``create_kv_cache_views``, kernel
block splitting): what ``register_kv_caches`` receives.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec, KVCacheLayout
from vllm.v1.worker.utils import allocate_kv_cache

from kvplug.paged_views import KV_LAST

LAYOUTS = [layout.name for layout in KVCacheLayout]


def attention_spec(heads: int, head_size: int, block_size: int, dtype=torch.bfloat16,
                   kv_format: str = KV_LAST) -> FullAttentionSpec:
    """A full-attention spec; kv_planes as b12x's customize_spec makes it (K and V as two head slots)."""
    extra = {} if kv_format == KV_LAST else dict(num_head_slots=2,
                                                 state_content_bytes=heads * head_size * dtype.itemsize)
    return FullAttentionSpec(block_size=block_size, num_kv_heads=heads, head_size=head_size, dtype=dtype, **extra)


def vllm_caches(layout: str, *, heads: int, head_size: int = 64, block_size: int = 32,
                kernel_block_size: int | None = None, num_blocks: int = 4, num_layers: int = 2,
                dtype=torch.bfloat16, device="cpu", kv_format: str = KV_LAST) -> dict[str, torch.Tensor]:
    """layer name -> vLLM's 4-D view of that layer (zeros), for one KVCacheLayout."""
    kv_layout = KVCacheLayout[layout]
    spec = attention_spec(heads, head_size, block_size, dtype, kv_format)
    groups = [KVCacheGroupSpec([f"layers.{i}.attn" for i in range(num_layers)], spec)]
    config = SimpleNamespace(  # the fields get_kv_cache_config_from_groups reads
        cache_config=SimpleNamespace(get_resolved_kv_cache_layout=lambda: kv_layout,
                                     num_gpu_blocks_override=num_blocks, prefix_cache_retention_interval=None),
        attention_config=SimpleNamespace(hisparse_config=None))
    kv_cache_config = get_kv_cache_config_from_groups(config, groups, available_memory=1 << 40)
    sizes = None if kernel_block_size is None else [kernel_block_size]
    return allocate_kv_cache(kv_cache_config, torch.device(device), kv_layout, sizes)
