"""KVPlugConnector: vLLM's KV connector interface, dispatching to the two halves.

vLLM builds one per role: in EngineCore the scheduler half (which owns the
TieredStore), in each worker the worker half (which copies bytes between the
paged KV cache and the store's shared-memory slab). Every method of vLLM
0.32's ``KVConnectorBase_V1`` is answered on purpose: see the table in
connectors/vllm/README.md.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

import logging

from kvplug.config import KVPlugConfig

from .geometry import geometry
from .metadata import KVPlugMetadata
from .scheduler import SchedulerHalf
from .stats import KVPlugPromMetrics, KVPlugStats
from .worker import WorkerHalf

log = logging.getLogger("vllm.kvplug")


class KVPlugConnector(KVConnectorBase_V1):
    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        config = KVPlugConfig.load(self._kv_transfer_config.kv_connector_extra_config)
        geo = geometry(vllm_config, kv_cache_config, config)
        self.scheduler: SchedulerHalf | None = None
        self.worker: WorkerHalf | None = None
        if role == KVConnectorRole.SCHEDULER:
            _apply_load_failure_policy(self._kv_transfer_config, config)
            events = getattr(vllm_config, "kv_events_config", None)
            self.scheduler = SchedulerHalf(config, geo, engine_id=str(self._kv_transfer_config.engine_id)[:8],
                                           kv_events=bool(events is not None and events.enable_kv_cache_events))
        else:
            self.worker = WorkerHalf(config, geo, _tensor_parallel_rank(geo))

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        # Loads and saves run layer by layer (wait_for_layer_load / save_kv_layer): a
        # full CUDA graph replay would skip those calls and read blocks still in flight.
        return True

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config) -> str | None:
        return None  # every layout vLLM offers is read from the tensors' strides (kvplug/layout.py)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a dropped save is a future miss, never lost work

    # -- scheduler side --------------------------------------------------------

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def get_external_cache_hit_sources(self, request, num_external_tokens: int) -> dict[CacheHitSource, int]:
        return self.scheduler.get_external_cache_hit_sources(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        return self.scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output) -> None:
        self.scheduler.update_connector_output(connector_output)

    def has_pending_block_frees(self) -> bool:
        return self.scheduler is not None and self.scheduler.has_pending_block_frees()

    def take_events(self):
        return self.scheduler.take_events() if self.scheduler is not None else ()

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request, block_ids)

    def reset_cache(self) -> bool | None:
        return self.scheduler.reset_cache() if self.scheduler is not None else None

    def bind_kv_cache_manager(self, kv_cache_manager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        self.scheduler.bind_kv_cache_manager(kv_cache_manager)

    # -- worker side -----------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker.register_kv_caches(kv_caches)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        assert isinstance(kv_connector_metadata, KVPlugMetadata)
        self.worker.handle_preemptions(kv_connector_metadata)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        self.worker.start_load(self._meta())

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.worker.wait_for_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        self.worker.save_layer(layer_name, self._meta())

    def wait_for_save(self) -> None:
        self.worker.wait_for_save(self._meta())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self.worker.get_finished() or None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.load_errors()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        return self.worker.take_worker_meta() if self.worker is not None else None

    def _meta(self) -> KVPlugMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVPlugMetadata)
        return meta

    # -- both ------------------------------------------------------------------

    def get_kv_connector_stats(self) -> KVPlugStats | None:
        if self.scheduler is not None:
            return self.scheduler.take_stats()
        return self.worker.stats.take()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVPlugStats:
        return KVPlugStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues) -> KVPlugPromMetrics:
        return KVPlugPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        half = self.scheduler or self.worker
        half.shutdown()


def _apply_load_failure_policy(kv_transfer_config, config: KVPlugConfig) -> None:
    """A block kvplug cannot load is recomputed, in both spellings: vLLM's own default
    ("fail", which the scheduler reads just after building this connector) fails the
    user's request instead. vLLM cannot tell that default from an explicit "fail", so
    failing requests is asked for with kvplug's ``load_failure_policy: fail``."""
    wanted = config.load_failure_policy
    if kv_transfer_config.kv_load_failure_policy != wanted:
        log.warning("kvplug: vLLM's kv_load_failure_policy %r -> %r, from kvplug's load_failure_policy (vLLM "
                    "cannot tell its default from an explicit choice; set load_failure_policy in "
                    "kv_connector_extra_config to change it)", kv_transfer_config.kv_load_failure_policy, wanted)
        kv_transfer_config.kv_load_failure_policy = wanted


def _tensor_parallel_rank(geo) -> int:
    if geo.tp_size == 1:
        return 0
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank()
