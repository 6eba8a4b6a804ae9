"""CUDAPipeline: LayerPipeline for paged KV on a GPU.

Encode/decode run on the device (the codec's Triton kernels) on side streams,
through a ring of ``RING`` device staging buffers of at most ``staging_bytes``
per direction. Two worker threads (load, save) issue all of it, so the
caller's thread only waits, in ``wait_layer``, until the load thread has
issued layer l, then makes the current stream wait on layer l's event (no
host sync). A save ticket is an event recorded on the copy stream after the
step's last copy: the worker half polls it, so the step never waits for saves.
``transport`` picks how rows cross PCIe (kvplug/transfer_movers.py).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from kvplug.transfer import LayerPipeline, Ticket, _Batch
from kvplug.transfer_movers import MOVERS, RING, cudart

log = logging.getLogger("kvplug")

MIN_COPY = 64 << 10  # auto layers_per_copy: the fewest layers whose bytes reach this
# Device staging row pitch for DMA loads is rounded up to this: on the H100 bench int4h's 4-layer
# copies (68 KiB) into 64 KiB-aligned rows loaded at 17.8 GB/s and overlapped (10.3 ms
# pipelined), unaligned at 11.9 GB/s and 14.5 ms (bench/results/transfer_*.json, "batch/4*")
STAGE_ROW_ALIGN = 64 << 10


class CUDAPipeline(LayerPipeline):
    cuda = True
    ring = RING

    def _setup(self, transport: str, layers_per_copy: int, issue: str, cpus) -> None:
        self.transport = self._pick(transport)
        lb = self.layer_bytes
        if self.transport == "uva":
            layers_per_copy = 1  # index kernels on one layer's rows
        elif layers_per_copy == 0:
            layers_per_copy = min(self.num_layers, -(-MIN_COPY // lb))
        self.layers_per_copy, self.issue = layers_per_copy, issue
        align = STAGE_ROW_ALIGN if self.transport != "uva" else 1  # uva: dense rows for index_select
        self._pitch = -(-layers_per_copy * lb // align) * align  # bytes of a load staging row
        self._load_rows = max(1, self.staging_bytes // (RING * self._pitch))
        self._save_rows = max(1, self.staging_bytes // (RING * lb))

        def init():
            torch.cuda.set_device(self.device)
        self._load_worker = ThreadPoolExecutor(1, thread_name_prefix="kvplug-load", initializer=init)
        self._save_worker = ThreadPoolExecutor(1, thread_name_prefix="kvplug-save", initializer=init)
        self._init_cuda()

    def _device_ids(self, ids: torch.Tensor, load: bool) -> torch.Tensor:
        # made on the stream that reads it, so freeing it can never race that stream
        with torch.cuda.stream(self._ld_codec if load else self._sv_codec):
            return ids.pin_memory().to(self.device, non_blocking=True)

    def _prepared(self, batch: _Batch, load: bool) -> None:
        self._mover.prepare(batch, self._ld_copy if load else self._sv_copy)

    def _start_load(self, batch: _Batch) -> None:
        flags = [threading.Event() for _ in range(self.num_layers)]
        events = [torch.cuda.Event() for _ in range(self.num_layers)]
        self._ready = list(zip(flags, events))
        self._ld_codec.wait_stream(torch.cuda.current_stream(self.device))  # the blocks' previous users
        self._loads.append(self._run(self._load_worker, self._load_job, batch, events, flags))

    def wait_layer(self, layer: int) -> None:
        if not self._ready:
            return
        flag, event = self._ready[layer]
        flag.wait()  # the load thread has issued the layer (an event never recorded is waited on as done)
        torch.cuda.current_stream(self.device).wait_event(event)

    def _start_save(self, batch: _Batch, layer: int) -> Future:
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))  # the layer's KV is written once this passes
        return self._run(self._save_worker, self._save_job, batch, layer, ready)

    def _ticket(self, futures: list[Future], block_ids: set[int], load: bool = False) -> Ticket:
        event = torch.cuda.Event()
        # Recorded by the thread that issued everything before it (FIFO), on the stream that
        # finishes last in that direction: no host sync.
        worker, stream = (self._load_worker, self._ld_codec) if load else (self._save_worker, self._sv_copy)
        futures = futures + [self._run(worker, event.record, stream)]
        return Ticket(futures, event, block_ids)

    def _sync_loads(self) -> None:
        self._ld_codec.synchronize()

    def _sync_saves(self) -> None:
        self._sv_copy.synchronize()

    def _run(self, worker: ThreadPoolExecutor, fn, *args) -> Future:
        if self.issue == "thread":
            return worker.submit(fn, *args)
        fut: Future = Future()  # issue="caller": issue here (a deep copy queue then blocks this thread)
        fut.set_result(fn(*args))
        return fut

    def _pick(self, transport: str) -> str:
        pinned = self.slab.is_pinned()
        if transport == "auto":
            if not pinned:
                return "host"
            try:
                return "batch" if cudart().has_batch else "runs"
            except (RuntimeError, OSError, AttributeError) as e:  # no usable libcudart: pure torch
                log.info("kvplug transfer: %s; moving rows with Tensor.copy_", e)
                return "rows"
        if transport != "host" and not pinned:
            raise ValueError(f"LayerPipeline: transport={transport!r} needs a pinned slab (CPUTier with pin=True "
                             "on tmpfs or anonymous memory); use 'host' or 'auto' for an unpinned one")
        if transport == "batch" and not cudart().has_batch:
            raise ValueError("LayerPipeline: transport='batch' needs cudaMemcpyBatchAsync (CUDA runtime >= 12.8)")
        return transport

    def _init_cuda(self) -> None:
        dev, lb = self.device, self.layer_bytes
        self._ld_copy, self._ld_codec = torch.cuda.Stream(dev), torch.cuda.Stream(dev)
        self._sv_codec, self._sv_copy = torch.cuda.Stream(dev), torch.cuda.Stream(dev)
        # staging rings, allocated once: never freed while the side streams may use them
        self._ld_stage = [torch.empty((self._load_rows, self._pitch), dtype=torch.uint8, device=dev)
                          for _ in range(RING)]
        self._sv_stage = [torch.empty((self._save_rows, lb), dtype=torch.uint8, device=dev) for _ in range(RING)]
        self._ld_full = [torch.cuda.Event() for _ in range(RING)]
        self._ld_free = [torch.cuda.Event() for _ in range(RING)]
        self._sv_full = [torch.cuda.Event() for _ in range(RING)]
        self._sv_free = [torch.cuda.Event() for _ in range(RING)]
        self._ld_k = self._sv_k = 0
        self._mover = MOVERS[self.transport](self)

    def _load_job(self, batch: _Batch, events: list, flags: list[threading.Event]) -> None:
        lb = self.layer_bytes
        try:
            for l0, l1 in self._groups:
                for i, j in batch.chunks(self._load_rows):
                    b = self._ld_k % RING
                    self._ld_k += 1
                    stage = self._ld_stage[b][:j - i, :(l1 - l0) * lb]
                    self._ld_copy.wait_event(self._ld_free[b])
                    with torch.cuda.stream(self._ld_copy):
                        self._guard(batch, i, j, lambda a, c, i=i, l0=l0, l1=l1, st=stage:
                                    self._mover.h2d(batch, l0, l1, a, c, st[a - i:c - i]), self._failed_loads)
                        self._ld_full[b].record()
                    self._ld_codec.wait_event(self._ld_full[b])
                    with torch.cuda.stream(self._ld_codec):
                        for layer in range(l0, l1):
                            k = layer - l0
                            self._decode_rows(batch, layer, i, j, stage[:, k * lb:(k + 1) * lb])
                        self._ld_free[b].record()
                for layer in range(l0, l1):
                    events[layer].record(self._ld_codec)
                    flags[layer].set()
        except Exception as e:  # noqa: BLE001 - unexpected: fail the batch rather than the step
            self._fail(self._failed_loads, batch.ids, e)
        finally:
            for flag in flags:  # an event never recorded is waited on as done: no hang
                flag.set()

    def _save_job(self, batch: _Batch, layer: int, ready) -> None:
        view = self.views[layer]
        for i, j in batch.chunks(self._save_rows):
            b = self._sv_k % RING
            self._sv_k += 1
            stage = self._sv_stage[b][:j - i]
            self._sv_codec.wait_event(ready)
            self._sv_codec.wait_event(self._sv_free[b])
            with torch.cuda.stream(self._sv_codec):
                self._guard(batch, i, j, lambda a, c, i=i, st=stage:
                            self.codec.encode(view, batch.ids_t[a:c], st[a - i:c - i]), self._failed_saves)
                self._sv_full[b].record()
            self._sv_copy.wait_event(self._sv_full[b])
            with torch.cuda.stream(self._sv_copy):
                self._guard(batch, i, j, lambda a, c, i=i, st=stage:
                            self._mover.d2h(batch, layer, a, c, st[a - i:c - i]), self._failed_saves)
                self._sv_free[b].record()
