"""Worker half: moves bytes between vLLM's paged KV and the store's slab slots.

It maps the slab the scheduler half's store created (named, with its
instance nonce, in the step's metadata) and decides nothing: the step's metadata says which blocks go to or
come from which slots, and ``kvplug.transfer.LayerPipeline`` moves them, layer
by layer (a thread on CPU, side streams on CUDA), so layer i's attention only
waits for layer i. A block that cannot be moved is reported: a failed load to
vLLM, which recomputes it; a failed save to the scheduler half, which drops it.

vLLM's runners ask for the step's results in different orders (the V1 mixin
after ``wait_for_save``; with speculative decoding ``wait_for_save`` comes
after ``get_finished`` / load errors / worker metadata): every answer is
pulled from what has finished so far (``_collect``), and what finishes later
is reported in a later step. A request is released (``get_finished``) only
once none of its saves is still being written.
"""

from __future__ import annotations

import logging
import os

import torch

from kvplug.config import ConfigError, KVPlugConfig, parse_cpu_list
from kvplug.layout import paged_view
from kvplug.tiers.cpu import CPUTier
from kvplug.transfer import LayerPipeline, Ticket

from .cpu_layout import probe_block_strides
from .layout_check import self_check
from .geometry import Geometry
from .metadata import KVPlugMetadata, KVPlugWorkerMetadata, LoadJob, SaveJob
from .stats import KVPlugStats

log = logging.getLogger("vllm.kvplug")  # under vLLM's logger: its handlers and format


class WorkerHalf:
    # Saves on vLLM's CPU backend end with their step (its runner is synchronous; the
    # transfer thread already overlaps the forward pass layer by layer). On CUDA they
    # complete asynchronously, polled through tickets: no host sync in the step.
    async_cpu_saves = False

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
        self._meta: KVPlugMetadata | None = None  # the step begun last
        self._saves: list[tuple[int, int]] = []   # this step's (block, slot)s to save
        self._saved_layers: set[int] = set()
        self._loads: list[tuple[Ticket, list[LoadJob], bool]] = []  # started: (ticket, jobs, failures reported)
        self._partial_failed: set[int] = set()    # failed blocks of partial loads run ahead of the step
        self._open_saves: dict[int, str] = {}     # save job -> request, until written
        self._sealed: list[tuple[Ticket, list[SaveJob]]] = []  # issued saves, polled until written
        self._release: set[str] = set()           # finished requests to report once their saves are done
        self._errors: set[int] = set()            # failed vLLM blocks, for get_block_ids_with_load_errors
        self._out = KVPlugWorkerMetadata()

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.geo.layer_names if n not in kv_caches]
        if missing:
            raise ValueError(f"kvplug: vLLM registered no KV cache for layers {missing[:3]}; expected one "
                             f"tensor per attention layer of the KV cache group ({len(self.geo.layer_names)} layers)")
        # paged_view raises with a clear message when a tensor does not fit the layout.
        geo = self.geo
        strides = probe_block_strides(geo.layout) if geo.cpu_backend else None
        mine = {name: kv_caches[name] for name in geo.layer_names}
        self._views = [paged_view(kv, geo.layout, strides, kv_format=geo.kv_format) for kv in mine.values()]
        # Probe, never assume: tagged values written through vLLM's own view come back through
        # kvplug's, and the codecs' round trips and partial loads touch only their tokens, or
        # kvplug refuses to start (it also compiles the kernels now, not in the first transfer).
        self_check(mine, geo.layout, kv_format=geo.kv_format, cpu_strides=strides, codec=geo.codec,
                   vllm_layout=geo.vllm_layout)

    def _attach(self, meta: KVPlugMetadata) -> LayerPipeline:
        # At the first step: the slab is created by the scheduler half, which vLLM
        # builds after the workers registered their caches, and named in the metadata.
        if self._pipe is None:
            name, nonce = meta.slab
            # Called inside vLLM's inference_mode: tensors made there could not be
            # written by the pipeline's threads, which run outside it.
            with torch.inference_mode(False):
                self._slab = CPUTier.attach(name, self.geo.block_bytes, self.config.shm_dir, nonce=nonce)
                shard = slice(self.rank * self.geo.shard_bytes, (self.rank + 1) * self.geo.shard_bytes)
                cpus = transfer_cpus(self.config.transfer_cpus, self.geo.tp_size) if self._views[0].device.type == "cpu" else None
                if cpus:
                    log.info("kvplug: transfer thread on CPUs %s (transfer_cpus=%s)", sorted(cpus), self.config.transfer_cpus)
                self._pipe = LayerPipeline(self.geo.codec, self._views, self._slab.buffer[:, shard], cpus=cpus)
            if self._pipe.cuda:
                log.info("kvplug: slab %s, transport %s", "page-locked" if self._slab.pinned else "NOT page-locked",
                         self._pipe.transport)
                if not self._slab.pinned:
                    self.stats.add("slab_unpinned")
            self._out.attached = 1
        return self._pipe

    def _begin(self, meta: KVPlugMetadata) -> LayerPipeline:
        """Once per step, whichever hook vLLM calls first: take in the step's metadata."""
        pipe = self._attach(meta)
        if meta is not self._meta:
            self._meta = meta
            self._saves = [(b, s) for job in meta.saves for b, s in zip(job.block_ids, job.slots)]
            self._saved_layers.clear()
            self._open_saves.update((job.job_id, job.req_id) for job in meta.saves)
            self._release.update(meta.release)
        return pipe

    # -- loads -------------------------------------------------------------------

    def handle_preemptions(self, meta: KVPlugMetadata) -> None:
        """Saves of preempted requests finish before their blocks can be reused."""
        if set(meta.preempted) & set(self._open_saves.values()):
            for ticket, _ in self._sealed:
                for fut in ticket.futures:
                    fut.result()
                if ticket.event is not None:
                    ticket.event.synchronize()

    def start_load(self, meta: KVPlugMetadata) -> None:
        pipe = self._begin(meta)
        if not meta.loads:
            return
        T = self.geo.block_tokens
        blocks = [(b, s, n) for job in meta.loads for b, s, n in zip(job.block_ids, job.slots, job.num_tokens)]
        self.stats.add("load_bytes", len(blocks) * self.geo.shard_bytes)
        if pipe.cuda:
            pipe.start_load(blocks)
            self._seal_loads(meta)
            return
        # A block the request hit only partly gets its hit tokens, and the forward
        # pass writes the rest. On CPU the load runs on a thread beside the forward
        # pass, so such a block is loaded whole, before the forward pass writes into it.
        partial = [(b, s, T) for b, s, n in blocks if n < T]
        if partial:
            pipe.start_load(partial)
            self._partial_failed.update(pipe.finish_load())
        pipe.start_load([blk for blk in blocks if blk[2] == T])
        self._seal_loads(meta)

    def _seal_loads(self, meta: KVPlugMetadata) -> None:
        ticket = self._pipe.seal_loads({b for job in meta.loads for b in job.block_ids})
        self._loads.append((ticket, meta.loads, False))

    def wait_for_layer(self, layer_name: str) -> None:
        layer = self._layer.get(layer_name)  # layers outside kvplug's group (e.g. KV-sharing) are not moved
        if self._pipe is not None and layer is not None:
            self._pipe.wait_layer(layer)

    # -- saves -------------------------------------------------------------------

    def save_layer(self, layer_name: str, meta: KVPlugMetadata) -> None:
        layer = self._layer.get(layer_name)
        if meta.saves and layer is not None:
            self._begin(meta).save_layer(layer, self._saves)
            self._saved_layers.add(layer)

    def wait_for_save(self, meta: KVPlugMetadata) -> None:
        """After the step's forward passes: save the layers the forward pass did not (a step
        without one saves every layer here) and wait until the step's saves are written."""
        pipe = self._begin(meta)
        if meta.saves:
            for layer in range(len(self._views)):
                if layer not in self._saved_layers:
                    pipe.save_layer(layer, self._saves)
        self._saved_layers = set(range(len(self._views)))
        if meta.saves:
            ticket = pipe.seal_saves({b for job in meta.saves for b in job.block_ids})
            if not (pipe.cuda or self.async_cpu_saves):
                for fut in ticket.futures:  # vLLM's CPU runner is synchronous: the step ends written
                    fut.result()
            self._sealed.append((ticket, meta.saves))
        self.stats.add("save_bytes", sum(len(job.block_ids) for job in meta.saves) * self.geo.shard_bytes)

    # -- step results: pulled by vLLM, in whatever order its runner asks ------------

    def _collect(self) -> None:
        """Move what has finished into the step's answers. Idempotent; a load's failures are
        taken before any save is reported, so a save computed over them is never reported first."""
        for k, (ticket, jobs, reported) in enumerate(self._loads):
            if not reported:  # failures in the step of the load (vLLM recomputes them at once)
                failed = self._pipe.failed_loads(ticket) | self._partial_failed
                self._partial_failed = set()
                for job in jobs:
                    bad = sorted(failed.intersection(job.block_ids))
                    if bad:
                        self._out.failed[job.job_id] = bad
                        self._errors.update(bad)
                self._loads[k] = (ticket, jobs, True)
        while self._loads and self._loads[0][0].done():  # landed: the scheduler may unpin the slots
            for job in self._loads.pop(0)[1]:
                self._out.done[job.job_id] = 1
        while self._sealed and self._sealed[0][0].done():  # in order: tickets complete in FIFO order
            ticket, jobs = self._sealed.pop(0)
            unsaved = self._pipe.failed_saves(ticket)
            for job in jobs:
                if unsaved.intersection(job.block_ids):
                    self._out.unsaved.append(job.job_id)
                self._out.done[job.job_id] = 1
                self._open_saves.pop(job.job_id, None)

    def get_finished(self) -> set[str]:
        """Released requests none of whose saves is still being written."""
        self._collect()
        busy = set(self._open_saves.values())
        done = {r for r in self._release if r not in busy}
        self._release -= done
        return done

    def load_errors(self) -> set[int]:
        self._collect()
        errors, self._errors = self._errors, set()
        return errors

    def take_worker_meta(self) -> KVPlugWorkerMetadata | None:
        self._collect()
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
