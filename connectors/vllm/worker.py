"""Worker half: copies bytes between vLLM's paged KV and the store's slab slots.

It maps the slab the scheduler half's store created (by name, in shared
memory) and never decides anything: the step's metadata says which blocks go
to or come from which slots. Layer l of a block lives at
``slab[slot, l * layer_bytes:(l + 1) * layer_bytes]``, encoded by the codec.

Loads run layer by layer ahead of the forward pass (a thread on CPU, a side
stream on CUDA), so layer i's attention only waits for layer i. A block that
cannot be read is reported to vLLM, which recomputes it. Saves encode each
layer right after the forward pass wrote it (``save_kv_layer``).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from kvplug.config import KVPlugConfig
from kvplug.layout import paged_view
from kvplug.tiers.cpu import CPUTier

from .geometry import Geometry
from .metadata import KVPlugMetadata, KVPlugWorkerMetadata, LoadJob, SaveJob
from .stats import KVPlugStats

log = logging.getLogger("vllm.kvplug")  # under vLLM's logger: its handlers and format


class WorkerHalf:
    def __init__(self, config: KVPlugConfig, geo: Geometry):
        if not config.shared_memory:
            raise ValueError("kvplug config: shared_memory=False is not accepted by the vLLM connector; "
                             "expected true (the worker process maps the scheduler's CPU slab)")
        self.config = config
        self.geo = geo
        self.stats = KVPlugStats()
        self._layer = {name: i for i, name in enumerate(geo.layer_names)}
        self._views: list[torch.Tensor] = []   # per layer: paged_view [num_blocks, 2, T, H, D]
        self._slab: CPUTier | None = None
        self._rows: list[torch.Tensor] = []    # per layer: [num_slots, layer_bytes] view into the slab
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="kvplug-load")
        self._load: Future | None = None
        self._ready: list[threading.Event] | list[torch.cuda.Event] = []
        self._stream = None
        self._saved_layers: set[int] = set()
        self._failed: dict[str, set[int]] = {}  # this step's failed loads: request -> vLLM blocks
        self._out = KVPlugWorkerMetadata()
        self._release: set[str] = set()

    # -- set-up ------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.geo.layer_names if n not in kv_caches]
        if missing:
            raise ValueError(f"kvplug: vLLM registered no KV cache for layers {missing[:3]}...")
        # paged_view raises with a clear message when a tensor does not fit the layout.
        self._views = [paged_view(kv_caches[name], self.geo.layout) for name in self.geo.layer_names]
        if self._views[0].is_cuda:
            self._stream = torch.cuda.Stream(self._views[0].device)

    def _attach(self) -> None:
        # Lazily: the slab is created by the scheduler half, which vLLM builds
        # after the workers registered their caches.
        if self._slab is not None:
            return
        self._slab = CPUTier.attach(self.geo.slab_name, self.geo.block_bytes, self.config.shm_dir)
        lb = self.geo.layer_bytes
        self._rows = [self._slab.buffer[:, l * lb:(l + 1) * lb] for l in range(self.geo.layout.num_layers)]
        self._out.attached = 1

    # -- loads -------------------------------------------------------------------

    def start_load(self, meta: KVPlugMetadata) -> None:
        self._attach()
        self._ready = []
        if not meta.loads:
            return
        T = self.geo.block_tokens
        blocks = [(job.req_id, b, s, n) for job in meta.loads for b, s, n in zip(job.block_ids, job.slots, job.num_tokens)]
        full = [blk for blk in blocks if blk[3] == T]
        # A block the request hit only partly is decoded whole, now, before the
        # forward pass writes this step's tokens into its tail: writing only its
        # first tokens would need the backend's layout inside a block (the CPU
        # backend stores K transposed), writing it whole later would clobber them.
        partial = [blk for blk in blocks if blk[3] < T]
        if partial:
            self.stats.add("load_seconds", self._decode_layers(partial))
        self.stats.add("load_bytes", len(blocks) * self.geo.block_bytes)
        if not full:
            return
        if self._stream is not None:
            self._ready = self._load_cuda(full)
        else:
            self._ready = [threading.Event() for _ in self._views]
            self._load = self._loader.submit(self._load_cpu, full, self._ready)

    def wait_for_layer(self, layer_name: str) -> None:
        if self._ready:
            ready = self._ready[self._layer[layer_name]]
            if isinstance(ready, threading.Event):
                ready.wait()
            else:
                torch.cuda.current_stream().wait_event(ready)

    def _load_cpu(self, blocks: list[tuple[str, int, int, int]], ready: list[threading.Event]) -> float:
        try:
            return self._decode_layers(blocks, lambda layer: ready[layer].set())
        finally:
            for event in ready:  # never leave the forward pass waiting
                event.set()

    def _load_cuda(self, blocks: list[tuple[str, int, int, int]]) -> list:
        """Queue every layer's copy + decode on a side stream; an event per layer."""
        events = [torch.cuda.Event() for _ in self._views]
        self._stream.wait_stream(torch.cuda.current_stream())  # blocks were allocated/zeroed on it
        with torch.cuda.stream(self._stream):
            self.stats.add("load_seconds", self._decode_layers(blocks, lambda layer: events[layer].record(self._stream)))
        return events

    def _decode_layers(self, blocks: list[tuple[str, int, int, int]], layer_done=None) -> float:
        """Decode blocks (req, block_id, slot, tokens) layer by layer into vLLM's cache,
        calling layer_done(layer) as each lands; a block that fails is noted for vLLM.
        Returns the seconds it took (counted by the caller's thread)."""
        t0 = time.perf_counter()
        bad: set[int] = set()  # indices into blocks
        for layer in range(len(self._views)):
            try:
                self._decode(layer, blocks)
            except Exception:  # find the culprits one block at a time
                for k, block in enumerate(blocks):
                    try:
                        self._decode(layer, [block])
                    except Exception as e:
                        if not bad:
                            log.warning("kvplug: loading block %d from slot %d failed: %r", block[1], block[2], e)
                        bad.add(k)
            if layer_done is not None:
                layer_done(layer)
        for k in bad:
            req_id, block_id, _, _ = blocks[k]
            self._failed.setdefault(req_id, set()).add(block_id)
        return time.perf_counter() - t0

    def _decode(self, layer: int, blocks: list[tuple[str, int, int, int]]) -> None:
        src = self._read_rows(layer, [s for _, _, s, _ in blocks])
        self.geo.codec.decode(src, self._views[layer], [b for _, b, _, _ in blocks])

    def _read_rows(self, layer: int, slots: list[int]) -> torch.Tensor:
        """One layer's encoded bytes of the given slots, as rows [len(slots), layer_bytes]."""
        return self._rows[layer][torch.as_tensor(slots, dtype=torch.long)]

    # -- saves -------------------------------------------------------------------

    def save_layer(self, layer_name: str, meta: KVPlugMetadata) -> None:
        if meta.saves:
            self._attach()  # without loads, vLLM starts the step's "loads" after the forward pass
            layer = self._layer[layer_name]
            self._save(layer, meta.saves)
            self._saved_layers.add(layer)

    def _save(self, layer: int, jobs: list[SaveJob]) -> None:
        t0 = time.perf_counter()
        ids = [b for job in jobs for b in job.block_ids]
        slots = torch.as_tensor([s for job in jobs for s in job.slots], dtype=torch.long)
        view = self._views[layer]
        out = torch.empty((len(ids), self.geo.layer_bytes), dtype=torch.uint8, device=view.device)
        self.geo.codec.encode(view, ids, out)
        self._rows[layer][slots] = out.cpu()
        self.stats.add("save_bytes", len(ids) * self.geo.layer_bytes)
        self.stats.add("save_seconds", time.perf_counter() - t0)

    def wait_for_save(self, meta: KVPlugMetadata) -> None:
        """End of the step: finish what the forward pass did not (a step without one
        saves every layer here), then note what is done for the scheduler."""
        self._attach()
        if meta.saves:
            for layer in range(len(self._views)):
                if layer not in self._saved_layers:
                    self._save(layer, meta.saves)
        self._saved_layers.clear()
        if self._load is not None:
            self.stats.add("load_seconds", self._load.result())
            self._load = None
        if self._stream is not None and meta.loads:
            self._stream.synchronize()
        for job in meta.saves:
            self._out.saved[job.job_id] = 1
        for job in meta.loads:
            self._out.loaded[job.req_id] = 1
        for req_id, ids in self._failed.items():
            self._out.failed[req_id] = sorted(ids)
        self._release.update(meta.release)

    # -- step results ------------------------------------------------------------

    def get_finished(self) -> set[str]:
        """Released requests: every save of theirs sent so far is done (saves finish within their step)."""
        done, self._release = self._release, set()
        return done

    def load_errors(self) -> set[int]:
        ids = {b for blocks in self._failed.values() for b in blocks}
        self._failed = {}
        return ids

    def take_worker_meta(self) -> KVPlugWorkerMetadata | None:
        out, self._out = self._out, KVPlugWorkerMetadata()
        return None if out.is_empty() else out

    def shutdown(self) -> None:
        self._loader.shutdown(wait=True)
        if self._slab is not None:
            self._slab.close()
            self._slab = None
