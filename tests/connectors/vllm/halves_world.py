"""The world the halves state machine plays in: the KV a model would compute for each
(identity, generation, token prefix, layer, rank), fault injection, deferred saves, the requests
it models. Shared by halves_requests.py, halves_steps.py and halves_checks.py."""

from __future__ import annotations

import itertools
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch
import xxhash
from hypothesis import strategies as st

from kvplug.transfer import LayerPipeline
from kvplug.transfer_cpu import CPUPipeline
from test_halves import NAMES, D, FakeRequest, H

LAYERS = len(NAMES)
NUM_BLOCKS = 32          # Engine's paged KV: blocks 1..31 are ours (0 is never handed out)
MAX_LIVE = 5             # requests waiting or running at once
ALPHABET = 4
STEMS = [[(i * 7 + s * 3 + (i * i) % 5 + s * i) % ALPHABET for i in range(64)] for s in range(2)]
GARBAGE = 77.0           # what a failed decode leaves in a block (a torn write): never a valid value
_names = itertools.count()


class Req(FakeRequest):
    """A vLLM request as the halves see it; num_tokens follows the tokens."""

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


# -- the KV a model would compute ---------------------------------------------------------

_C1, _C2, _C3 = (np.uint64(x) for x in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))
_IDX = np.arange(2 * H * D, dtype=np.uint64)


def _salt(layer: int, rank: int, tainted: bool = False) -> int:
    return 1 + layer * 16 + rank * 4 + (1000 if tainted else 0)


def _values(seeds: np.ndarray, salt: int) -> torch.Tensor:
    """[len(seeds), 2, H, D] bf16 of multiples of 1/16 in [-8, 8): exact in bf16."""
    with np.errstate(over="ignore"):
        z = seeds[:, None] * _C1 + (_IDX[None, :] + np.uint64(salt)) * _C2
        z ^= z >> np.uint64(31)
        z *= _C3
        z ^= z >> np.uint64(29)
        z *= _C1
        z ^= z >> np.uint64(32)
    v = ((z >> np.uint64(56)).astype(np.int64) - 128).astype(np.float32) / 16
    return torch.from_numpy(v.reshape(len(seeds), 2, H, D)).to(torch.bfloat16)


def _seeds(ident, gen: int, tokens, start: int = 0, h: int | None = None) -> tuple[np.ndarray, int]:
    """Chained hashes of each prefix tokens[:p + 1] for p >= start (h: the hash before start)."""
    if h is None:
        h = xxhash.xxh64_intdigest(repr((ident, gen)).encode())
    out = np.empty(len(tokens) - start, dtype=np.uint64)
    for i in range(start, len(tokens)):
        h = xxhash.xxh64_intdigest(h.to_bytes(8, "little") + int(tokens[i]).to_bytes(8, "little", signed=True))
        out[i - start] = h
    return out, h


class Truth:
    """Expected KV of one request under one generation, extended as its tokens grow."""

    def __init__(self, ident, gen: int, tp: int):
        self.ident, self.gen, self.tp = ident, gen, tp
        self.n, self.h = 0, None
        self.good = [[torch.empty(0, 2, H, D, dtype=torch.bfloat16) for _ in range(tp)] for _ in range(LAYERS)]
        self.bad = [[torch.empty(0, 2, H, D, dtype=torch.bfloat16) for _ in range(tp)] for _ in range(LAYERS)]

    def extend(self, tokens) -> None:
        if len(tokens) <= self.n:
            return
        seeds, self.h = _seeds(self.ident, self.gen, tokens, self.n, self.h)
        for layer in range(LAYERS):
            for rank in range(self.tp):
                self.good[layer][rank] = torch.cat([self.good[layer][rank], _values(seeds, _salt(layer, rank))])
                self.bad[layer][rank] = torch.cat([self.bad[layer][rank], _values(seeds, _salt(layer, rank, True))])
        self.n = len(tokens)


# -- fault injection: a decode that raises for chosen blocks of chosen ranks ----------------

FAIL: dict[int, set[int]] = {}   # storage pointer of a rank's first paged KV -> vLLM blocks that fail
_decode_rows = LayerPipeline._decode_rows


def _failing_decode_rows(self, batch, layer, i, j, rows):
    bad = FAIL.get(self.views[0].untyped_storage().data_ptr())
    if not bad or not any(batch.ids[k] in bad for k in range(i, j)):
        return _decode_rows(self, batch, layer, i, j, rows)
    for k in range(i, j):
        if batch.ids[k] in bad:
            self.views[layer][batch.ids[k]].fill_(GARBAGE)  # half-written, then the read "fails"
            self._fail(self._failed_loads, [batch.ids[k]], OSError("injected read error"))
        else:
            _decode_rows(self, batch, layer, k, k + 1, rows[k - i:k - i + 1])


# -- saves completing when the test says: CUDA's asynchronous saves, deterministically, on CPU ----


class LazyFuture(Future):
    """A task that runs when the test lets it, or when its result is asked for."""

    def __init__(self, fn, args):
        super().__init__()
        self.fn, self.args = fn, args

    def run(self) -> None:
        if not self.done():
            try:
                self.set_result(self.fn(*self.args))
            except BaseException as e:  # noqa: BLE001 - kept for result(), as an executor would
                self.set_exception(e)

    def result(self, timeout=None):
        self.run()
        return super().result(timeout)


class Deferred:
    """A CPU pipeline's save executor whose tasks wait for ``run_all``: a save may still be
    unwritten any number of steps after wait_for_save (with worker.async_cpu_saves)."""

    def __init__(self):
        self.pending: list[LazyFuture] = []

    def submit(self, fn, *args) -> LazyFuture:
        fut = LazyFuture(fn, args)
        self.pending.append(fut)
        return fut

    def run_all(self) -> None:
        pending, self.pending = self.pending, []
        for fut in pending:
            fut.run()

    def shutdown(self, wait: bool = True) -> None:
        self.run_all()


DEFER_SAVES = [False]
_cpu_setup = CPUPipeline._setup


def _setup_deferring(self, *args, **kwargs):
    _cpu_setup(self, *args, **kwargs)
    if DEFER_SAVES[0]:
        self._save_worker = Deferred()


# -- the model -------------------------------------------------------------------------------------


class MReq:
    """A request as vLLM's scheduler holds it."""

    def __init__(self, req: Req, ident, max_len: int, embeds: bool):
        self.req, self.ident, self.max_len, self.embeds = req, ident, max_len, embeds
        self.status = "waiting"   # waiting | running | held (finished, blocks kept for kvplug) | gone
        self.blocks: list[int] = []
        self.stale = False        # holds KV computed before a reset (older "weights")
        self._truth: dict[int, Truth] = {}

    @property
    def rid(self) -> str:
        return self.req.request_id

    @property
    def ncomp(self) -> int:
        return self.req.num_computed_tokens

    def truth(self, gen: int, tp: int) -> Truth:
        t = self._truth.get(gen)
        if t is None:
            t = self._truth[gen] = Truth(self.ident, gen, tp)
        t.extend(self.req.all_token_ids)
        return t

    def __repr__(self) -> str:
        return f"<{self.rid} {self.ident} {self.status} ncomp={self.ncomp}/{self.req.num_tokens} blocks={self.blocks}>"


@dataclass
class Entry:
    """A request in the step being scheduled."""
    mr: MReq
    chunk: int                 # tokens computed this step
    local: int = 0             # tokens vLLM's prefix cache gave (shared blocks)
    ext: int = 0               # external tokens vLLM counts as loaded by kvplug this step
    start: int = 0             # num_computed_tokens before this step
    donor: str | None = None   # request whose blocks it shares
    waiting: bool = False      # scheduled from the waiting queue


@dataclass
class Step:
    entries: list[Entry]
    meta: object
    aborted: set = field(default_factory=set)   # ids aborted after the step was built


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _common(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


prompts = st.builds(lambda s, k, tail: (STEMS[s][:k] + tail) or [s],
                    st.integers(0, 1), st.sampled_from([32, 0, 5, 16, 20, 33, 48, 64]),
                    st.lists(st.integers(0, ALPHABET - 1), max_size=12))
