"""CPUPipeline: LayerPipeline for paged KV in host memory (vLLM's CPU backend).

One worker thread per pipeline decodes loads from the slab rows, setting a
threading.Event per layer, and encodes saves. ``cpus`` pins that thread (e.g.
to a core the engine keeps free of compute threads), so that it overlaps the
forward pass instead of taking turns with it. A save ticket is done when the
thread has written its rows; the CPU runner is synchronous, so the worker half
waits for it at the end of the step.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from kvplug.transfer import LayerPipeline, Ticket, _Batch
from kvplug.transfer_movers import gather_rows, is_run, scatter_rows

log = logging.getLogger("kvplug")


class CPUPipeline(LayerPipeline):
    cuda = False
    ring = 1

    def _setup(self, transport: str, layers_per_copy: int, issue: str, cpus) -> None:
        self.transport, self.layers_per_copy, self.issue = "cpu", 1, "thread"  # no copy to batch
        lb = self.layer_bytes
        self._load_rows = max(1, self.staging_bytes // lb)
        self._save_rows = max(1, self.staging_bytes // lb)

        def pin():  # off the compute cores, when given others: the forward pass keeps its cores
            if cpus:
                try:
                    os.sched_setaffinity(0, cpus)
                except OSError as e:  # a failing initializer would break the pool: run unpinned
                    log.warning("kvplug transfer: cannot pin the transfer thread to CPUs %s (%s); "
                                "it runs where the caller does", sorted(cpus), e)
        self._load_worker = self._save_worker = ThreadPoolExecutor(1, thread_name_prefix="kvplug-transfer",
                                                                   initializer=pin)
        self._stage = torch.empty((max(self._load_rows, self._save_rows), lb), dtype=torch.uint8)

    def _start_load(self, batch: _Batch) -> None:
        self._ready = [threading.Event() for _ in range(self.num_layers)]
        self._loads.append(self._load_worker.submit(self._load_job, batch, self._ready))

    def wait_layer(self, layer: int) -> None:
        if self._ready:
            self._ready[layer].wait()

    def _start_save(self, batch: _Batch, layer: int) -> Future:
        return self._save_worker.submit(self._save_job, batch, layer)

    def _ticket(self, futures: list[Future], block_ids: set[int], load: bool = False) -> Ticket:
        return Ticket(futures, None, block_ids)

    def _load_job(self, batch: _Batch, ready: list[threading.Event]) -> None:
        lb = self.layer_bytes
        try:
            for layer in range(self.num_layers):
                for i, j in batch.chunks(self._load_rows):
                    if is_run(batch.slots[i:j]):  # decode straight from the slab
                        s0 = int(batch.slots[i])
                        rows = self.slab[s0:s0 + j - i, layer * lb:(layer + 1) * lb]
                    else:
                        rows = self._stage[:j - i]
                        gather_rows(rows, batch.rows[i:j], layer * lb)
                    self._decode_rows(batch, layer, i, j, rows)
                ready[layer].set()
        except Exception as e:  # noqa: BLE001 - unexpected: fail the batch rather than the step
            self._fail(self._failed_loads, batch.ids, e)
        finally:
            for event in ready:  # never leave the forward pass waiting
                event.set()

    def _save_job(self, batch: _Batch, layer: int) -> None:
        view, lb = self.views[layer], self.layer_bytes

        def save(a: int, b: int, i: int) -> None:
            if is_run(batch.slots[a:b]):  # encode straight into the slab, as loads decode from it
                s0 = int(batch.slots[a])
                self.codec.encode(view, batch.ids_t[a:b], self.slab[s0:s0 + b - a, layer * lb:(layer + 1) * lb])
                return
            rows = self._stage[a - i:b - i]
            self.codec.encode(view, batch.ids_t[a:b], rows)
            scatter_rows(rows, batch.rows[a:b], layer * lb)

        for i, j in batch.chunks(self._save_rows):
            self._guard(batch, i, j, lambda a, b, i=i: save(a, b, i), self._failed_saves)
