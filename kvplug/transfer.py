"""LayerPipeline: encoded KV between one worker's paged KV and CPU slab slots, layer by layer.

Layer l of a stored block lives at ``slab[slot, l * layer_bytes:(l + 1) * layer_bytes]``
(the codec's bytes; ``kvplug.tiers.cpu.CPUTier.buffer`` is such a slab). A load
queues every layer at once and ``wait_layer(l)`` holds the caller back for
layer l only, so layer i's attention runs while layer i+1 is in flight. A save
encodes one layer as soon as the forward pass has written it.

CUDA (views on a GPU): encode/decode run on the device (the codec's Triton
kernels) on side streams, through a ring of ``RING`` device staging buffers of
at most ``staging_bytes`` per direction, so memory does not grow with the
number of blocks (more blocks: more chunks). Two worker threads (load, save)
issue all of it: a deep queue of small copies blocks the thread that issues
it (measured: issuing a 4k-token load on the caller's thread held it for
18.5 of the 18.9 ms), so the caller's thread only waits, in ``wait_layer``,
until the load thread has issued layer l, then makes the current stream wait
on layer l's event (no host sync). ``finish_saves`` / ``finish_load`` block.

Rows of a batch sit at arbitrary slots; ``transport`` picks how they cross
PCIe (bench/test_bench_transfer.py measures each; H100 figures in
bench/results/transfer_nvidia_h100_80gb_hbm3.json):

  batch  one cudaMemcpyBatchAsync per chunk, a descriptor per row: copy engines
         only, so loads overlap compute. The default (CUDA runtime >= 12.8).
  runs   one cudaMemcpy2DAsync per run of consecutive slots: as fast as batch
         when the slots are consecutive, far slower when they are scattered
  rows   one Tensor.copy_(non_blocking) per row (pure torch): 4-6 GB/s
  uva    the pinned slab mapped into the device's address space; torch
         index_select / index_copy_ kernels read and write it: the highest
         bandwidth alone, but it fills the SMs and does not overlap compute
  host   the worker threads gather / scatter rows (memmove) through pinned
         staging, one big copy per chunk: 3-5 GB/s, for an unpinned slab only

A load copies ``layers_per_copy`` consecutive layers of a block at once (one
contiguous span of its slot), into staging rows aligned to ``STAGE_ROW_ALIGN``:
small copies are slow (int4h's 17 KiB layer rows crossed at ~3 GB/s one by
one, 4 layers a copy at 12-18 GB/s). The default takes the fewest layers
whose bytes reach 64 KiB (raw bf16 at 8 heads x 128: 1; int4h: 4).

CPU (views in host memory, vLLM's CPU backend): the same API; one worker thread
per pipeline decodes from the slab rows and sets a threading.Event per layer;
it encodes saves too. ``cpus`` pins that thread (e.g. to a core the engine keeps
free of compute threads), so that it overlaps the forward pass instead of
taking turns with it.

Partial blocks (num_tokens < block_tokens) are decoded into a scratch block
and only their first num_tokens tokens are copied into the paged block: the
rest belongs to the request, which may write it before waiting for the layer.
On vLLM's CPU backend K and V have different strides (its "vec" ISA keeps K
transposed): the views are then ``kvplug.layout.SplitKV``, which the torch
codec path and ``copy_tokens`` handle like a tensor.

A block that cannot be moved (bad block id or slot, or its decode / encode
raised) is reported by ``finish_load`` / ``finish_saves``; every waiter is
released whatever happens.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from kvplug.layout import copy_tokens
from kvplug.transfer_movers import MOVERS, RING, cudart, gather_rows, is_run, scatter_rows

log = logging.getLogger("kvplug")

TRANSPORTS = ("auto", "batch", "runs", "rows", "uva", "host")
MIN_COPY = 64 << 10  # auto layers_per_copy: the fewest layers whose bytes reach this
# Device staging row pitch for DMA loads is rounded up to this: on the H100 bench int4h's 4-layer
# copies (68 KiB) into 64 KiB-aligned rows loaded at 17.8 GB/s and overlapped (10.3 ms
# pipelined), unaligned at 11.9 GB/s and 14.5 ms (bench/results/transfer_*.json, "batch/4*")
STAGE_ROW_ALIGN = 64 << 10


@dataclass
class _Batch:
    """Valid blocks of one load or save, full blocks first; tensors made once."""
    ids: list[int]
    slots: np.ndarray            # int64
    rows: list[int]              # address of each slot's first byte in the slab
    ntok: list[int]              # tokens to write (loads); block_tokens for saves
    nf: int                      # number of full blocks (they come first)
    ids_t: torch.Tensor          # block ids on the views' device
    extra: dict = field(default_factory=dict)  # per-transport prepared values

    def chunks(self, m: int):
        return [(i, min(i + m, len(self.ids))) for i in range(0, len(self.ids), m)]


class LayerPipeline:
    def __init__(self, codec, views: Sequence[torch.Tensor], slab: torch.Tensor, *,
                 staging_bytes: int = 64 << 20, transport: str = "auto", layers_per_copy: int = 0,
                 issue: str = "thread", cpus: set[int] | None = None):
        lay = codec.layout
        if len(views) != lay.num_layers:
            raise ValueError(f"LayerPipeline: {len(views)} paged views for a {lay.num_layers}-layer layout")
        lb = codec.layer_bytes
        if slab.dtype != torch.uint8 or slab.dim() != 2 or slab.stride(1) != 1 or slab.shape[1] < lay.num_layers * lb:
            raise ValueError(f"LayerPipeline: slab must be uint8 [num_slots, >= {lay.num_layers * lb}] with "
                             f"contiguous rows, got {slab.dtype} {list(slab.shape)} strides {slab.stride()}")
        if transport not in TRANSPORTS:
            raise ValueError(f"LayerPipeline: transport={transport!r}; expected one of {list(TRANSPORTS)}")
        if issue not in ("thread", "caller"):
            raise ValueError(f"LayerPipeline: issue={issue!r}; expected 'thread' or 'caller'")
        if not 0 <= layers_per_copy <= lay.num_layers:
            raise ValueError(f"LayerPipeline: layers_per_copy={layers_per_copy}; expected 0 (auto) .. {lay.num_layers}")
        self.codec, self.views, self.slab = codec, list(views), slab
        self.num_layers, self.layer_bytes, self.block_tokens = lay.num_layers, lb, lay.block_tokens
        self.device = self.views[0].device
        self.cuda = self.device.type == "cuda"
        self.transport = self._pick(transport) if self.cuda else "cpu"
        if not self.cuda or self.transport == "uva":
            layers_per_copy = 1  # CPU: no copy to batch; uva: index kernels on one layer's rows
        elif layers_per_copy == 0:
            layers_per_copy = min(lay.num_layers, -(-MIN_COPY // lb))
        self.layers_per_copy = g = layers_per_copy
        self.issue = issue if self.cuda else "thread"  # CUDA: which thread issues copies and kernels
        self._groups = [(l0, min(l0 + g, self.num_layers)) for l0 in range(0, self.num_layers, g)]
        self.staging_bytes = staging_bytes
        ring = RING if self.cuda else 1
        align = STAGE_ROW_ALIGN if self.cuda and self.transport != "uva" else 1  # uva: dense rows for index_select
        self._pitch = -(-g * lb // align) * align  # bytes of a load staging row
        self._load_rows = max(1, staging_bytes // (ring * self._pitch))  # blocks per load chunk
        self._save_rows = max(1, staging_bytes // (ring * lb))      # blocks per save chunk
        self._partial_rows = max(1, min(self._load_rows, staging_bytes // (ring * lay.raw_layer_bytes())))
        self._lock = threading.Lock()
        self._failed_loads: set[int] = set()
        self._failed_saves: set[int] = set()
        self._warned = self._closed = False
        self._loads: list[Future] = []
        self._saves: list[Future] = []
        self._ready: list = []  # per layer: threading.Event (CPU) / (threading.Event, cuda.Event)
        self._save_batch: tuple | None = None  # (blocks, _Batch): the same list is saved for every layer
        self._scratch: torch.Tensor | None = None
        self._arange: torch.Tensor | None = None
        if self.cuda:
            def init():
                torch.cuda.set_device(self.device)
            self._load_worker = ThreadPoolExecutor(1, thread_name_prefix="kvplug-load", initializer=init)
            self._save_worker = ThreadPoolExecutor(1, thread_name_prefix="kvplug-save", initializer=init)
            self._init_cuda()
        else:
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

    @property
    def rows_per_chunk(self) -> int:
        """Blocks per load chunk (each moves ``layers_per_copy`` layers of every block)."""
        return self._load_rows

    # -- public API --------------------------------------------------------------

    def start_load(self, blocks: Sequence[tuple[int, int, int]]) -> None:
        """Queue every layer of blocks (block_id, slot, num_tokens) from the slab into the paged KV."""
        batch = self._prepare(blocks, True, self._failed_loads)
        if batch is None:
            return
        flags = [threading.Event() for _ in range(self.num_layers)]
        if not self.cuda:
            self._ready = flags
            self._loads.append(self._load_worker.submit(self._cpu_load_job, batch, flags))
            return
        events = [torch.cuda.Event() for _ in range(self.num_layers)]
        self._ready = list(zip(flags, events))
        self._ld_codec.wait_stream(torch.cuda.current_stream(self.device))  # the blocks' previous users
        self._loads.append(self._run(self._load_worker, self._cuda_load_job, batch, events, flags))

    def wait_layer(self, layer: int) -> None:
        """Make the caller (CPU) or the current stream (CUDA, no host sync) wait until layer ``layer`` landed."""
        if not self._ready:
            return
        if not self.cuda:
            self._ready[layer].wait()
            return
        flag, event = self._ready[layer]
        flag.wait()  # the load thread has issued the layer (an event never recorded is waited on as done)
        torch.cuda.current_stream(self.device).wait_event(event)

    def finish_load(self) -> list[int]:
        """Wait until every queued load landed; the block ids that failed since the last call."""
        for fut in self._loads:
            fut.result()
        self._loads = []
        if self.cuda:
            self._ld_codec.synchronize()
        with self._lock:
            failed, self._failed_loads = sorted(self._failed_loads), set()
        return failed

    def save_layer(self, layer: int, blocks: Sequence[tuple[int, int]]) -> None:
        """Start encoding layer ``layer`` of blocks (block_id, slot) into the slab rows."""
        if self._save_batch is not None and self._save_batch[0] == blocks:
            batch = self._save_batch[1]
        else:
            batch = self._prepare([(b, s, self.block_tokens) for b, s in blocks], False, self._failed_saves)
            self._save_batch = (list(blocks), batch)
        if batch is None:
            return
        if not self.cuda:
            self._saves.append(self._save_worker.submit(self._cpu_save_job, batch, layer))
            return
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))  # the layer's KV is written once this passes
        self._saves.append(self._run(self._save_worker, self._cuda_save_job, batch, layer, ready))

    def finish_saves(self) -> list[int]:
        """Wait until every queued save's bytes are in the slab; the block ids that failed since the last call."""
        for fut in self._saves:
            fut.result()
        self._saves = []
        self._save_batch = None
        if self.cuda:
            self._sv_copy.synchronize()
        with self._lock:
            failed, self._failed_saves = sorted(self._failed_saves), set()
        return failed

    def close(self) -> None:
        """Finish what is queued and stop the worker threads; the pipeline is unusable afterwards."""
        if self._closed:
            return
        self.finish_saves()
        self.finish_load()
        self._closed = True
        self._load_worker.shutdown(wait=True)
        self._save_worker.shutdown(wait=True)

    # -- shared ------------------------------------------------------------------

    def _run(self, worker: ThreadPoolExecutor, fn, *args) -> Future:
        if self.issue == "thread":
            return worker.submit(fn, *args)
        fut: Future = Future()  # issue="caller": issue here (a deep copy queue then blocks this thread)
        fut.set_result(fn(*args))
        return fut

    def _prepare(self, blocks, load: bool, failed: set[int]) -> _Batch | None:
        nb, ns, T = self.views[0].shape[0], self.slab.shape[0], self.block_tokens
        full, part, bad, seen = [], [], [], set()
        for b, s, n in blocks:
            b, s, n = int(b), int(s), int(n)
            if n == 0 and load:
                continue
            if not (0 <= b < nb and 0 <= s < ns and 0 < n <= T) or b in seen:
                bad.append(b)
                continue
            seen.add(b)
            (full if n == T else part).append((b, s, n))
        if bad:
            log.warning("kvplug transfer: %d blocks with an invalid block id, slot or token count (block %d ...)",
                        len(bad), bad[0])
            with self._lock:
                failed.update(bad)
        entries = full + part
        if not entries:
            return None
        ids = [e[0] for e in entries]
        ids_t = torch.tensor(ids, dtype=torch.long)
        if self.cuda:
            # made on the stream that reads it, so freeing it can never race that stream
            with torch.cuda.stream(self._ld_codec if load else self._sv_codec):
                ids_t = ids_t.pin_memory().to(self.device, non_blocking=True)
        slots = np.array([e[1] for e in entries], dtype=np.int64)
        base, stride = self.slab.data_ptr(), self.slab.stride(0)
        batch = _Batch(ids, slots, [base + int(s) * stride for s in slots], [e[2] for e in entries],
                       len(full), ids_t)
        if self.cuda:
            self._mover.prepare(batch, self._ld_copy if load else self._sv_copy)
        return batch

    def _guard(self, batch: _Batch, a: int, b: int, fn, failed: set[int]) -> None:
        """fn(a, b) for rows [a, b); if it raises, each row alone, noting the rows that still fail."""
        try:
            fn(a, b)
            return
        except Exception as e:  # noqa: BLE001 - any failure of a block is reported, never raised
            if b - a == 1:
                self._fail(failed, [batch.ids[a]], e)
                return
        for k in range(a, b):
            try:
                fn(k, k + 1)
            except Exception as e:  # noqa: BLE001
                self._fail(failed, [batch.ids[k]], e)

    def _fail(self, failed: set[int], ids, exc: BaseException) -> None:
        with self._lock:
            failed.update(ids)
        if not self._warned:
            self._warned = True
            log.warning("kvplug transfer: moving block %d failed: %r (further failures are reported quietly)",
                        ids[0], exc)

    def _decode_rows(self, batch: _Batch, layer: int, i: int, j: int, rows: torch.Tensor) -> None:
        """Decode rows (batch rows [i, j)) into the paged KV: full blocks whole, partial ones by token."""
        view, f = self.views[layer], min(j, batch.nf)
        if i < f:
            self._guard(batch, i, f, lambda a, b: self.codec.decode(rows[a - i:b - i], view, batch.ids_t[a:b]),
                        self._failed_loads)
        for p in range(max(i, f), j, self._partial_rows):
            q = min(j, p + self._partial_rows)
            self._guard(batch, p, q, lambda a, b: self._decode_partial(batch, view, a, b, rows[a - i:b - i]),
                        self._failed_loads)

    def _decode_partial(self, batch: _Batch, view: torch.Tensor, a: int, b: int, rows: torch.Tensor) -> None:
        k = b - a
        if self._scratch is None or self._scratch.shape[0] < k:
            # on CUDA this runs on the decode stream, which is then the only one to use it
            self._scratch = torch.empty((k,) + tuple(view.shape[1:]), dtype=view.dtype, device=self.device)
            self._arange = torch.arange(k, device=self.device)
        scratch = self._scratch[:k]
        self.codec.decode(rows, scratch, self._arange[:k])
        for r in range(k):
            n = batch.ntok[a + r]
            copy_tokens(view, batch.ids[a + r], scratch[r], n)

    # -- CPU ---------------------------------------------------------------------

    def _cpu_load_job(self, batch: _Batch, ready: list[threading.Event]) -> None:
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

    def _cpu_save_job(self, batch: _Batch, layer: int) -> None:
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

    # -- CUDA --------------------------------------------------------------------

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

    def _cuda_load_job(self, batch: _Batch, events: list, flags: list[threading.Event]) -> None:
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

    def _cuda_save_job(self, batch: _Batch, layer: int, ready) -> None:
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
