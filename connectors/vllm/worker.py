"""Worker half: moves bytes between vLLM's paged KV and the store's slab slots.

It maps the slab the scheduler half's store created (by name, in shared
memory) and decides nothing: the step's metadata says which blocks go to or
come from which slots, and ``kvplug.transfer.LayerPipeline`` moves them, layer
by layer (a thread on CPU, side streams on CUDA), so layer i's attention only
waits for layer i. A block that cannot be moved is reported: a failed load to
vLLM, which recomputes it; a failed save to the scheduler half, which drops it.
"""

from __future__ import annotations

import logging
import os

import torch

from kvplug.config import ConfigError, KVPlugConfig, parse_cpu_list
from kvplug.layout import paged_view
from kvplug.tiers.cpu import CPUTier
from kvplug.transfer import LayerPipeline

from .cpu_layout import probe_block_strides
from .geometry import Geometry
from .metadata import KVPlugMetadata, KVPlugWorkerMetadata
from .stats import KVPlugStats

log = logging.getLogger("vllm.kvplug")  # under vLLM's logger: its handlers and format


class WorkerHalf:
    def __init__(self, config: KVPlugConfig, geo: Geometry, rank: int = 0):
        if not config.shared_memory:
            raise ValueError("kvplug config: shared_memory=False is not accepted by the vLLM connector; "
                             "expected true (the worker process maps the scheduler's CPU slab)")
        self.config = config
        self.geo = geo
        self.rank = rank  # tensor-parallel rank: which shard of each slot is ours
        self.stats = KVPlugStats()
        self._layer = {name: i for i, name in enumerate(geo.layer_names)}
        self._views: list[torch.Tensor] = []   # per layer: paged_view [num_blocks, 2, T, H, D]
        self._slab: CPUTier | None = None
        self._pipe: LayerPipeline | None = None
        self._saves: tuple[KVPlugMetadata, list[tuple[int, int]]] | None = None  # this step's (block, slot)s
        self._saved_layers: set[int] = set()
        self._load_owner: dict[int, str] = {}  # vLLM block -> request, for this step's loads
        self._failed: dict[str, set[int]] = {}  # this step's failed loads: request -> vLLM blocks
        self._out = KVPlugWorkerMetadata()
        self._release: set[str] = set()

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.geo.layer_names if n not in kv_caches]
        if missing:
            raise ValueError(f"kvplug: vLLM registered no KV cache for layers {missing[:3]}...")
        # paged_view raises with a clear message when a tensor does not fit the layout.
        first = kv_caches[self.geo.layer_names[0]]
        strides = probe_block_strides(self.geo.layout) if first.device.type == "cpu" and first.dim() == 4 else None
        self._views = [paged_view(kv_caches[name], self.geo.layout, strides) for name in self.geo.layer_names]

    def _attach(self) -> LayerPipeline:
        # Lazily: the slab is created by the scheduler half, which vLLM builds
        # after the workers registered their caches.
        if self._pipe is None:
            # Called inside vLLM's inference_mode: tensors made there could not be
            # written by the pipeline's threads, which run outside it.
            with torch.inference_mode(False):
                self._slab = CPUTier.attach(self.geo.slab_name, self.geo.block_bytes, self.config.shm_dir)
                shard = slice(self.rank * self.geo.shard_bytes, (self.rank + 1) * self.geo.shard_bytes)
                cpus = transfer_cpus(self.config.transfer_cpus, self.geo.tp_size) if self._views[0].device.type == "cpu" else None
                if cpus:
                    log.info("kvplug: transfer thread on CPUs %s (transfer_cpus=%s)", sorted(cpus), self.config.transfer_cpus)
                self._pipe = LayerPipeline(self.geo.codec, self._views, self._slab.buffer[:, shard], cpus=cpus)
            self._out.attached = 1
        return self._pipe

    # -- loads -------------------------------------------------------------------

    def start_load(self, meta: KVPlugMetadata) -> None:
        pipe = self._attach()
        if not meta.loads:
            return
        T = self.geo.block_tokens
        blocks = [(b, s, n) for job in meta.loads for b, s, n in zip(job.block_ids, job.slots, job.num_tokens)]
        self._load_owner = {b: job.req_id for job in meta.loads for b in job.block_ids}
        self.stats.add("load_bytes", len(blocks) * self.geo.shard_bytes)
        if pipe.cuda:
            pipe.start_load(blocks)
            return
        # A block the request hit only partly gets its hit tokens, and the forward
        # pass writes the rest. On CPU the load runs on a thread beside the forward
        # pass, so such a block is loaded whole, before the forward pass writes into it.
        partial = [(b, s, T) for b, s, n in blocks if n < T]
        if partial:
            pipe.start_load(partial)
            self._note_failed(pipe.finish_load())
        pipe.start_load([blk for blk in blocks if blk[2] == T])

    def wait_for_layer(self, layer_name: str) -> None:
        if self._pipe is not None:
            self._pipe.wait_layer(self._layer[layer_name])

    def _note_failed(self, block_ids: list[int]) -> None:
        for b in block_ids:
            self._failed.setdefault(self._load_owner.get(b, ""), set()).add(b)

    # -- saves -------------------------------------------------------------------

    def save_layer(self, layer_name: str, meta: KVPlugMetadata) -> None:
        if meta.saves:
            layer = self._layer[layer_name]
            self._attach().save_layer(layer, self._save_blocks(meta))
            self._saved_layers.add(layer)

    def _save_blocks(self, meta: KVPlugMetadata) -> list[tuple[int, int]]:
        if self._saves is None or self._saves[0] is not meta:
            self._saves = (meta, [(b, s) for job in meta.saves for b, s in zip(job.block_ids, job.slots)])
        return self._saves[1]

    def wait_for_save(self, meta: KVPlugMetadata) -> None:
        """End of the step: save the layers the forward pass did not (a step without
        one saves every layer here), wait for every transfer, note what is done."""
        pipe = self._attach()
        if meta.saves:
            for layer in range(len(self._views)):
                if layer not in self._saved_layers:
                    pipe.save_layer(layer, self._save_blocks(meta))
        self._saved_layers.clear()
        unsaved = set(pipe.finish_saves())
        self._note_failed(pipe.finish_load())
        for job in meta.saves:
            self._out.saved[job.job_id] = 1
            if unsaved.intersection(job.block_ids):
                self._out.unsaved.append(job.job_id)
        self.stats.add("save_bytes", sum(len(job.block_ids) for job in meta.saves) * self.geo.shard_bytes)
        for job in meta.loads:
            self._out.loaded[job.req_id] = 1
        for req_id, ids in self._failed.items():
            self._out.failed[req_id] = sorted(ids)
        self._release.update(meta.release)
        self._saves = None

    # -- step results ------------------------------------------------------------

    def get_finished(self) -> set[str]:
        """Released requests: every save of theirs sent so far is done (saves finish within their step)."""
        done, self._release = self._release, set()
        return done

    def load_errors(self) -> set[int]:
        ids = {b for blocks in self._failed.values() for b in blocks}
        self._failed, self._load_owner = {}, {}
        return ids

    def take_worker_meta(self) -> KVPlugWorkerMetadata | None:
        out, self._out = self._out, KVPlugWorkerMetadata()
        return None if out.is_empty() else out

    def shutdown(self) -> None:
        if self._pipe is not None:
            self._pipe.close()
        if self._slab is not None:
            self._slab.close()
        self._pipe = self._slab = None


def transfer_cpus(setting: str, tp_size: int) -> set[int] | None:
    """The cores for the CPU transfer thread; None leaves it on the compute cores.

    "auto": vLLM's CPU worker binds each of its compute threads to a core of
    its own and reserves other cores (one more per rank when a KV connector is
    configured) for work besides the forward pass: take the cores the engine
    process may use that no compute thread of this worker is bound to. With
    several ranks the others' compute cores are not known here, so the thread
    stays on this rank's cores. A list is kept to the cores this process may use."""
    if setting == "shared":
        return None
    try:
        allowed = os.sched_getaffinity(os.getppid())
    except OSError:  # no such parent, or no permission: leave the thread where it is
        return None
    if setting != "auto":
        cpus = parse_cpu_list(setting) & (allowed | os.sched_getaffinity(0))
        if not cpus:
            raise ConfigError(f"kvplug config: transfer_cpus={setting!r} names no CPU this engine may run on; "
                              f"expected some of {sorted(allowed)}, \"auto\" or \"shared\"")
        return cpus
    if tp_size > 1:
        return None
    spare = allowed - _bound_cores(allowed)
    return spare if spare and spare != allowed else None


def _bound_cores(allowed: set[int]) -> set[int]:
    """The cores this process's threads are bound to (threads that may run anywhere are not bound)."""
    bound: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            mask = os.sched_getaffinity(int(tid))
        except OSError:  # the thread ended meanwhile
            continue
        if mask < allowed:
            bound |= mask
    return bound
