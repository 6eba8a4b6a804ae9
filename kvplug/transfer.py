"""LayerPipeline: encoded KV between one worker's paged KV and CPU slab slots, layer by layer.

Layer l of a stored block lives at ``slab[slot, l * layer_bytes:(l + 1) * layer_bytes]``
(the codec's bytes; ``kvplug.tiers.cpu.CPUTier.buffer`` is such a slab). A load
queues every layer at once and ``wait_layer(l)`` holds the caller back for
layer l only, so layer i's attention runs while layer i+1 is in flight. A save
encodes one layer as soon as the forward pass has written it; ``seal_saves``
turns what was issued into a ticket that can be polled without blocking.

The device is decided once: ``LayerPipeline(...)`` builds a ``CPUPipeline``
(transfer_cpu.py: a worker thread beside the forward pass) or a
``CUDAPipeline`` (transfer_cuda.py: side streams, staging rings, transports in
transfer_movers.py) from the views' device. This file holds what both share:
batches, partial blocks, failure handling, tickets.

Partial blocks (num_tokens < block_tokens) are decoded into a scratch block
and only their first num_tokens tokens are copied into the paged block: the
rest belongs to the request, which may write it before waiting for the layer.
When K and V have different strides (vLLM's CPU "vec" ISA keeps K transposed)
the views are ``kvplug.layout.SplitKV``, which the torch codec path and
``copy_tokens`` handle like a tensor.

A block that cannot be moved (bad block id or slot, or its decode / encode
raised) is reported by ``finish_load`` / ``failed_saves`` / ``finish_saves``;
every waiter is released whatever happens.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from kvplug.layout import copy_tokens

log = logging.getLogger("kvplug")

TRANSPORTS = ("auto", "batch", "runs", "rows", "uva", "host")


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


@dataclass
class Ticket:
    """The loads or saves issued up to ``seal_loads`` / ``seal_saves``: done once every one of
    them has landed (in the paged KV, or in the slab)."""
    futures: list[Future]
    event: object = None         # CUDA: recorded on the decode (loads) or copy (saves) stream after the last op
    block_ids: set[int] = field(default_factory=set)

    def done(self) -> bool:
        return all(f.done() for f in self.futures) and (self.event is None or self.event.query())


class LayerPipeline:
    cuda = False

    def __new__(cls, codec, views: Sequence[torch.Tensor], *args, **kwargs):
        if cls is LayerPipeline:  # the device is decided here, once
            if views and views[0].device.type == "cuda":
                from kvplug.transfer_cuda import CUDAPipeline as cls
            else:
                from kvplug.transfer_cpu import CPUPipeline as cls
        return super().__new__(cls)

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
        self.staging_bytes = staging_bytes
        self._lock = threading.Lock()
        self._failed_loads: set[int] = set()
        self._failed_saves: set[int] = set()
        self._warned = self._closed = False
        self._loads: list[Future] = []
        self._saves: list[Future] = []
        self._ready: list = []  # per layer: what wait_layer waits on
        self._save_batch: tuple | None = None  # (blocks, _Batch): the same list is saved for every layer
        self._scratch: torch.Tensor | None = None
        self._arange: torch.Tensor | None = None
        self._setup(transport, layers_per_copy, issue, cpus)
        self._groups = [(l0, min(l0 + self.layers_per_copy, self.num_layers))
                        for l0 in range(0, self.num_layers, self.layers_per_copy)]
        self._partial_rows = max(1, min(self._load_rows, staging_bytes // (self.ring * lay.raw_layer_bytes())))

    @property
    def rows_per_chunk(self) -> int:
        """Blocks per load chunk (each moves ``layers_per_copy`` layers of every block)."""
        return self._load_rows

    # -- what each device does its own way ----------------------------------------

    def _setup(self, transport: str, layers_per_copy: int, issue: str, cpus) -> None:
        raise NotImplementedError

    def _device_ids(self, ids: torch.Tensor, load: bool) -> torch.Tensor:
        return ids

    def _prepared(self, batch: _Batch, load: bool) -> None:
        pass

    def _start_load(self, batch: _Batch) -> None:
        raise NotImplementedError

    def _start_save(self, batch: _Batch, layer: int) -> Future:
        raise NotImplementedError

    def _ticket(self, futures: list[Future], block_ids: set[int], load: bool = False) -> Ticket:
        raise NotImplementedError

    def _sync_loads(self) -> None:
        pass

    def _sync_saves(self) -> None:
        pass

    def wait_layer(self, layer: int) -> None:
        """Make the caller (CPU) or the current stream (CUDA, no host sync) wait until layer ``layer`` landed."""
        raise NotImplementedError

    # -- public API --------------------------------------------------------------

    def start_load(self, blocks: Sequence[tuple[int, int, int]]) -> None:
        """Queue every layer of blocks (block_id, slot, num_tokens) from the slab into the paged KV."""
        batch = self._prepare(blocks, True, self._failed_loads)
        if batch is not None:
            self._start_load(batch)

    def seal_loads(self, block_ids: set[int]) -> Ticket:
        """The loads issued so far (of ``block_ids``) as one ticket, polled with ``done()``: once
        done, their slots may be reused. Their failures are known earlier (``failed_loads``)."""
        futures, self._loads = self._loads, []
        return self._ticket(futures, set(block_ids), load=True)

    def failed_loads(self, ticket: Ticket) -> set[int]:
        """The blocks of a ticket's loads that failed. Waits only for the loads to be issued
        (after the forward pass they are: it waited for every layer), never for the device."""
        for fut in ticket.futures:
            fut.result()
        with self._lock:
            failed = self._failed_loads & ticket.block_ids
            self._failed_loads -= failed
        return failed

    def finish_load(self) -> list[int]:
        """Wait until every queued load landed; the block ids that failed since the last call."""
        for fut in self._loads:
            fut.result()
        self._loads = []
        self._sync_loads()
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
        if batch is not None:
            self._saves.append(self._start_save(batch, layer))

    def seal_saves(self, block_ids: set[int]) -> Ticket:
        """The saves issued so far (of ``block_ids``) as one ticket; ``ticket.done()`` polls
        them without blocking (CPU: the transfer thread's futures; CUDA: an event)."""
        futures, self._saves, self._save_batch = self._saves, [], None
        return self._ticket(futures, set(block_ids))

    def failed_saves(self, ticket: Ticket) -> set[int]:
        """The blocks of a done ticket that could not be written."""
        with self._lock:
            failed = self._failed_saves & ticket.block_ids
            self._failed_saves -= failed
        return failed

    def finish_saves(self) -> list[int]:
        """Wait until every queued save's bytes are in the slab; the block ids that failed since the last call."""
        for fut in self._saves:
            fut.result()
        self._saves = []
        self._save_batch = None
        self._sync_saves()
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
        ids_t = self._device_ids(torch.tensor(ids, dtype=torch.long), load)
        slots = np.array([e[1] for e in entries], dtype=np.int64)
        base, stride = self.slab.data_ptr(), self.slab.stride(0)
        batch = _Batch(ids, slots, [base + int(s) * stride for s in slots], [e[2] for e in entries],
                       len(full), ids_t)
        self._prepared(batch, load)
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
