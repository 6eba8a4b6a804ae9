"""Layout, codec, key root and slab name, from vLLM's config alone.

The worker registers its KV tensors before the scheduler-side connector
exists (EngineCore builds the executor first), so both halves derive
everything they must agree on from ``vllm_config`` and ``kv_cache_config``:
the worker then only checks its real tensors against it.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.v1.kv_cache_interface import FullAttentionSpec

from kvplug.codec import Codec, get_codec
from kvplug.config import KVPlugConfig
from kvplug.keys import fingerprint
from kvplug.layout import DTYPES, KVLayout


@dataclass(frozen=True)
class Geometry:
    layout: KVLayout
    layer_names: tuple[str, ...]  # layer i of a stored block is layer_names[i]
    codec: Codec
    root: bytes                   # fingerprint: the parent of every first block
    slab_name: str                # the CPU tier's shared-memory file

    @property
    def block_tokens(self) -> int:
        return self.layout.block_tokens

    @property
    def layer_bytes(self) -> int:
        return self.codec.layer_bytes

    @property
    def block_bytes(self) -> int:
        return self.codec.block_bytes


def geometry(vllm_config, kv_cache_config, config: KVPlugConfig) -> Geometry:
    parallel = vllm_config.parallel_config
    world_size = parallel.tensor_parallel_size * parallel.pipeline_parallel_size
    if world_size != 1:
        # One slot would have to hold every rank's heads/layers: not built yet.
        raise ValueError(f"kvplug: tensor/pipeline parallel is not supported yet "
                         f"(tensor_parallel_size={parallel.tensor_parallel_size}, "
                         f"pipeline_parallel_size={parallel.pipeline_parallel_size}); expected 1 and 1")
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1 or type(groups[0].kv_cache_spec) is not FullAttentionSpec:
        kinds = [type(g.kv_cache_spec).__name__ for g in groups]
        raise ValueError(f"kvplug: only models whose layers all use full attention are supported; "
                         f"this one has KV cache groups {kinds}")
    spec = groups[0].kv_cache_spec
    if spec.head_size_v not in (None, spec.head_size):
        raise ValueError(f"kvplug: K and V head sizes differ ({spec.head_size} vs {spec.head_size_v})")
    dtype = next((name for name, t in DTYPES.items() if t == spec.dtype), None)
    if dtype is None:
        raise ValueError(f"kvplug: KV cache dtype {spec.dtype} is not supported; expected one of {sorted(DTYPES)} "
                         "(quantized KV caches such as fp8 are not)")
    layout = KVLayout(num_layers=len(groups[0].layer_names), num_kv_heads=spec.num_kv_heads,
                      head_size=spec.head_size, block_tokens=spec.block_size, dtype=dtype)
    codec = get_codec(config.codec, layout, config.int4h_group)
    model = vllm_config.model_config
    root = fingerprint(model.model, layout.describe(), config.codec, rank=0, world_size=world_size,
                       extra={"codec": codec.describe(), "revision": model.revision})
    engine_id = vllm_config.kv_transfer_config.engine_id
    return Geometry(layout, tuple(groups[0].layer_names), codec, root, f"kvplug-{engine_id}")
