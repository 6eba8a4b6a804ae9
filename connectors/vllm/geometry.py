"""Layout, codec, key root and slab name, from vLLM's config alone.

The worker registers its KV tensors before the scheduler-side connector
exists (EngineCore builds the executor first), so both halves derive
everything they must agree on from ``vllm_config`` and ``kv_cache_config``:
the worker then only checks its real tensors against it.

Tensor parallel: each rank holds its own KV heads, and a stored block holds
every rank's shard side by side, ``slot = [rank 0 | rank 1 | ...]``, each
shard that rank's layers in the codec's bytes. One key per block means one
lookup for all ranks (the scheduler half is one process), a block is visible
only once every rank has written its shard, and a block is never half a hit.
The tensor-parallel size is in the fingerprint: a store written with another
split is another root, a miss, never a wrong load. The fingerprint covers
everything else that determines the bytes too (identity.model_fingerprint).

What kvplug cannot store yet is refused here, at start-up, with the setting
named: pipeline and context parallelism, engines over several nodes, models
with more than one KV cache group (hybrid, or all layers sliding-window),
non-causal (prefix-LM) and diffusion models, quantized KV caches, speculative
decoding methods whose draft model has a KV cache, and sleep mode (CUDA only:
not tested with kvplug). Models mixing sliding-window and full attention run
with vLLM's hybrid manager off (kvplug is not SupportsHMA), so vLLM keeps every
block of every layer: one full-attention group, stored like any other.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.v1.kv_cache_interface import FullAttentionSpec

from kvplug.codec import Codec, get_codec
from kvplug.config import KVPlugConfig
from kvplug.layout import DTYPES, KVLayout

from .identity import model_fingerprint
from .layout_check import kv_format_of

# Speculative methods that propose tokens without a KV cache of their own: the
# target's KV (all kvplug stores) is the same as without them.
KV_FREE_SPECULATION = ("ngram", "ngram_gpu", "suffix", "medusa", "mlp_speculator")


@dataclass(frozen=True)
class Geometry:
    layout: KVLayout
    layer_names: tuple[str, ...]  # layer i of a stored block is layer_names[i]
    codec: Codec
    root: bytes                   # fingerprint: the store's, and the base of every request's root
    tp_size: int = 1
    kv_format: str = "kv_last"    # how vLLM's 4-D GPU views pack K and V (layout_check.kv_format_of)
    vllm_layout: str | None = None  # vLLM's KVCacheLayout name, for messages
    cpu_backend: bool = False     # vLLM's CPU backend: its own 4-D layout, probed (cpu_layout.py)              # tensor-parallel ranks, each with its shard of a stored block

    @property
    def block_tokens(self) -> int:
        return self.layout.block_tokens

    @property
    def layer_bytes(self) -> int:
        return self.codec.layer_bytes

    @property
    def shard_bytes(self) -> int:
        """One rank's part of a stored block: its heads, every layer."""
        return self.codec.block_bytes

    @property
    def block_bytes(self) -> int:
        """A stored block: every rank's shard."""
        return self.tp_size * self.codec.block_bytes


def geometry(vllm_config, kv_cache_config, config: KVPlugConfig) -> Geometry:
    parallel = vllm_config.parallel_config
    for name in ("pipeline_parallel_size", "decode_context_parallel_size", "prefill_context_parallel_size"):
        # Pipeline parallel splits layers, context parallel a block's tokens, across ranks.
        if getattr(parallel, name, 1) != 1:
            raise ValueError(f"kvplug: {name}={getattr(parallel, name)} is not supported yet; expected 1 "
                             "(tensor parallel is supported)")
    if getattr(parallel, "nnodes", 1) != 1:
        raise ValueError(f"kvplug: an engine over {parallel.nnodes} nodes is not supported yet; expected 1 "
                         "(every rank maps the CPU tier's slab from one node's shared memory)")
    if getattr(getattr(vllm_config, "model_config", None), "enable_sleep_mode", False):
        raise ValueError("kvplug: enable_sleep_mode=True is not supported yet (not tested with kvplug: sleep mode "
                         "runs on CUDA only); expected False. Weights updated in place are supported: call "
                         "reset_prefix_cache(reset_connector=True) afterwards")
    spec_method = getattr(getattr(vllm_config, "speculative_config", None), "method", None)
    if spec_method is not None and spec_method not in KV_FREE_SPECULATION:
        raise ValueError(f"kvplug: speculative decoding with method={spec_method!r} is not supported yet "
                         f"(its draft model has a KV cache kvplug does not store); expected one of "
                         f"{list(KV_FREE_SPECULATION)} or none")
    tp = parallel.tensor_parallel_size
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1 or type(groups[0].kv_cache_spec) is not FullAttentionSpec:
        kinds = [type(g.kv_cache_spec).__name__ for g in groups]
        raise ValueError(f"kvplug: only models whose layers all use full attention are supported; "
                         f"this one has KV cache groups {kinds} (sliding-window, hybrid and MLA models are not)")
    spec = groups[0].kv_cache_spec
    if getattr(spec, "non_causal", False):
        # Bidirectional attention: a block's KV depends on later tokens (vLLM turns its own
        # prefix caching off for these models), so a stored prefix is not the request's KV.
        raise ValueError("kvplug: models with non_causal attention (prefix-LM) are not supported: a block's KV "
                         "depends on tokens after it; expected causal attention")
    if callable(getattr(vllm_config.model_config, "is_diffusion", None)) and vllm_config.model_config.is_diffusion():
        raise ValueError("kvplug: diffusion language models are not supported (their KV is not a function of "
                         "the prefix); expected a causal model")
    if spec.head_size_v not in (None, spec.head_size):
        raise ValueError(f"kvplug: K and V head sizes differ ({spec.head_size} vs {spec.head_size_v}); "
                         "expected equal head sizes")
    dtype = next((name for name, t in DTYPES.items() if t == spec.dtype), None)
    cache_dtype = getattr(getattr(vllm_config, "cache_config", None), "cache_dtype", "auto")
    if dtype is None:
        raise ValueError(f"kvplug: kv_cache_dtype={cache_dtype!r} (KV cache dtype {spec.dtype}) is not supported; "
                         f"expected \"auto\" (one of {sorted(DTYPES)}); quantized KV caches such as fp8 are not")
    # spec.num_kv_heads is already one rank's share of the heads.
    layout = KVLayout(num_layers=len(groups[0].layer_names), num_kv_heads=spec.num_kv_heads,
                      head_size=spec.head_size, block_tokens=spec.block_size, dtype=dtype)
    codec = get_codec(config.codec, layout, config.int4h_group)
    root = model_fingerprint(vllm_config, layout.describe(), codec.describe(), config.codec, tp)
    kv_format = kv_format_of(spec) if hasattr(spec, "num_head_slots") else "kv_last"
    vllm_layout = getattr(getattr(vllm_config, "cache_config", None), "kv_cache_layout", None)
    device = getattr(getattr(vllm_config, "device_config", None), "device_type", None)
    return Geometry(layout, tuple(groups[0].layer_names), codec, root, tp, kv_format,
                    None if vllm_layout is None else str(vllm_layout), cpu_backend=device == "cpu")
