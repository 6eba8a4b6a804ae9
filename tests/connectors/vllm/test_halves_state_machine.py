"""The connector's scheduler half and worker half(s), driven by a hypothesis state machine
through vLLM's call orders, against a model of what the paged KV cache and the store must hold.

The model plays vLLM (its scheduler as of 0.32, ``vllm/v1/core/sched/scheduler.py``, and its
KV connector mixin, ``vllm/v1/worker/kv_connector_model_runner_mixin.py``) around the two
halves of test_halves.py's ``Engine`` (one worker per tensor-parallel rank):

- requests: prompts over a 4-token alphabet built on two shared stems (block size T=16), or
  follow-ups of earlier requests (their identity, a prefix of their tokens, more), with an
  identity (base model, LoRA adapter A or B whose directory holds a file this test writes and
  rewrites in place, cache salt "x" / "y" / none), some with prompt embeddings (never stored
  nor loaded); ids of released requests are reused;
- a step is scheduled (lookup, allocation with the matched count, fewer, 0 or none at all,
  vLLM prefix-cache sharing of another request's blocks, preemptions of the last running
  request to make room, the blocks freed last reused first), then built
  (``build_connector_meta``), then run on every rank, in lock-step layer by layer: the V1 mixin
  order (start_load, per-layer wait / save, wait_for_save, then get_finished, load errors,
  worker metadata), the speculative-decoding order (results before wait_for_save), a
  full-graph replay (no per-layer hook) or a step without tokens; then vLLM's update: load
  errors truncate the requests that hold a failed block (vLLM's own algorithm), finished
  requests are finished, then ``update_connector_output``, then finished_sending frees blocks;
- aborts between scheduling and building (a planned load), between building and running (a load
  or save sent), mid-save (saves not yet reported), request id reuse, preemption (also all
  running requests by reset_prefix_cache), reset_cache (a new generation of "weights": KV
  computed before is wrong after), LoRA files rewritten in place, injected decode failures of
  chosen blocks on chosen ranks, saves that complete steps after their wait_for_save (the
  worker's async_cpu_saves, CUDA's behaviour, with saves written only when the test lets them).

The fake forward pass writes, at each computed position, layer and rank, a value that is a
function of (identity, generation, token prefix, layer, rank), unless the context it attends to
(every earlier position of the request, read from the paged cache at that layer, on every rank)
is not what it should be: then it writes a "tainted" value, as a model computing over a wrong
KV would. Invariants:

- a load lands the KV of the loading request's identity, generation and prefix by the time the
  layer is waited for, or the block is reported in that step's load errors (exactly the failed
  blocks, on the rank that failed);
- every computed position of a running request holds its value, except blocks vLLM was told
  failed and has not recomputed yet;
- every block visible in the store holds, in every rank's shard, the KV of the tokens and
  identity its key was chained from (never tainted KV, never another identity's);
- the worker releases only finished requests none of whose saves is being written, reports
  every job once per rank, saves only after they are written; the scheduler sends one load per
  request vLLM counts external tokens for, exactly into the blocks vLLM allocated;
- when every request is finished and released: no job, no pin, no slot being stored or leaked,
  no request state; finished requests are released within a few steps without tokens.

Shrinking a failure takes minutes: it is off unless KVPLUG_SM_SHRINK=1.
"""

from __future__ import annotations

import copy
import itertools
import os
import shutil
import tempfile
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch
import xxhash
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvplug.block_state import BlockState
from kvplug.connectors.vllm.request_state import LoadPhase
from kvplug.keys import block_key, tokens_array
from kvplug.transfer import LayerPipeline
from kvplug.transfer_cpu import CPUPipeline
from test_halves import NAMES, D, Engine, FakeRequest, H, T

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


class HalvesMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.e = None
        self.built = None

    # -- set-up ---------------------------------------------------------------------------

    @initialize(tp=st.sampled_from([1, 2]), small=st.booleans(), async_saves=st.booleans(),
                pool=st.sampled_from([NUM_BLOCKS - 1, 12]))
    def setup(self, tp, small, async_saves, pool):
        self.tmp = tempfile.mkdtemp(prefix="kvplug-sm-")
        LayerPipeline._decode_rows = _failing_decode_rows
        CPUPipeline._setup = _setup_deferring
        FAIL.clear()
        DEFER_SAVES[0] = async_saves
        self.tp = tp
        self.lora_dirs, self.lora_version = {}, {}
        for name in ("A", "B"):
            self.lora_dirs[name] = os.path.join(self.tmp, f"lora-{name}")
            os.makedirs(self.lora_dirs[name])
            self.lora_version[name] = 0
            self._write_adapter(name)
        # small: a CPU tier of a few slots, so that saves find no slot and blocks are evicted
        self.e = Engine(self.tmp, name=f"sm{next(_names)}", tp=tp, cpu_bytes="48KiB" if small else "4MiB")
        for worker in self.e.workers:  # saves completing after their step, polled, as on CUDA
            worker.async_cpu_saves = async_saves  # (and written only when the test lets them: Deferred)
        self.sched = self.e.sched
        self.store = self.sched.store
        self.sched.bind_kv_cache_manager(SimpleNamespace(get_block_ids=lambda rid: (list(self.current[rid].blocks),)))
        self.ptr_of_rank = {}
        for rank, kv in enumerate(self.e.kvs):
            self.ptr_of_rank[rank] = kv[NAMES[0]].untyped_storage().data_ptr()
        self.gen = 0
        self.epoch_gen = {self.store.epoch: 0}
        self.all: list[MReq] = []           # every request ever made (keeps their ids alive)
        self.current: dict[str, MReq] = {}  # request id -> the request holding it now
        self.by_obj: dict[int, MReq] = {}
        self.running: list[MReq] = []        # vLLM's running queue, in order
        self.batch: list[Entry] = []
        self.built: Step | None = None
        self.preempted_ids: set[str] = set()
        self.batch_preempted = False         # a preemption in this schedule(): no waiting request is scheduled
        self.refs = [0] * NUM_BLOCKS
        self.free = list(range(1, pool + 1))  # (12: vLLM preempts often to make room)
        self.deferred: list[int] = []        # blocks freed once the built step has run
        self.known_bad: set[int] = set()     # blocks vLLM was told failed, not recomputed yet
        self.finished_count: dict[str, int] = {}  # vLLM's KVOutputAggregator: req -> ranks still to report
        self.jobs: dict[int, tuple[str, str]] = {}  # job id -> (load | save, request id)
        self.open_saves = [dict() for _ in range(tp)]  # per rank: save job -> request, until wait_for_save
        self.sealed = [set() for _ in range(tp)]       # per rank: saves written
        self.started = [set() for _ in range(tp)]      # per rank: loads started
        self.reported = [set() for _ in range(tp)]     # per rank: jobs reported done
        self.registry: dict[bytes, tuple] = {}         # store key -> (identity, generation, token prefix)
        self.reg_upto: dict[int, tuple] = {}             # id(state) -> (state, full blocks, parent, tail) registered
        self.slot_expect: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
        self.verified: dict[bytes, int] = {}           # visible key -> the slot it was checked in
        self.rid_counter = itertools.count()
        self.embeds_counter = itertools.count()

    def teardown(self):
        LayerPipeline._decode_rows = _decode_rows
        CPUPipeline._setup = _cpu_setup
        FAIL.clear()
        if self.e is not None:
            try:
                self.e.close()
            finally:
                shutil.rmtree(self.tmp, ignore_errors=True)

    def _write_adapter(self, name: str) -> None:
        with open(os.path.join(self.lora_dirs[name], "adapter_config.json"), "w") as f:
            f.write('{"adapter": "%s", "version": %06d}' % (name, self.lora_version[name]))  # same size each time

    # -- helpers ----------------------------------------------------------------------------

    def _alloc(self, n: int) -> list[int]:
        """The n blocks freed last (reused at once: what a use after free would hit)."""
        blocks = [self.free.pop() for _ in range(n)]
        for b in blocks:
            self.refs[b] += 1
        return blocks

    def _free_blocks(self, blocks: list[int]) -> None:
        for b in blocks:
            self.refs[b] -= 1
            assert self.refs[b] >= 0
            if self.refs[b] == 0:
                self.free.append(b)
                self.known_bad.discard(b)

    def _live(self) -> list[MReq]:
        return [m for m in self.current.values() if m.status in ("waiting", "running")]

    def _in_batch(self, mr: MReq) -> Entry | None:
        return next((e for e in self.batch if e.mr is mr), None)

    def _waiting(self) -> list[MReq]:
        return [m for m in self.current.values() if m.status == "waiting"]

    def _context_bad(self, mr: MReq) -> bool:
        """Its context holds a block vLLM was told failed that was not recomputed (for its positions)."""
        for i, b in enumerate(mr.blocks[:_ceil(mr.ncomp, T)]):
            if b in self.known_bad and any(self._wrong_positions(mr, i * T, min(mr.ncomp, (i + 1) * T), layer)
                                           for layer in range(LAYERS)):
                return True
        return False

    def _gather(self, rank: int, layer: int, mr: MReq, start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end)
        blocks = torch.tensor([mr.blocks[p // T] for p in range(start, end)], dtype=torch.long)
        return self.e.kvs[rank][NAMES[layer]][blocks, :, pos % T]

    def _wrong_positions(self, mr: MReq, start: int, end: int, layer: int) -> list[int]:
        """Positions in [start, end) whose KV at ``layer`` differs from the truth on some rank."""
        if end <= start:
            return []
        truth = mr.truth(self.gen, self.tp)
        wrong = torch.zeros(end - start, dtype=torch.bool)
        for rank in range(self.tp):
            got = self._gather(rank, layer, mr, start, end)
            wrong |= ~(got == truth.good[layer][rank][start:end]).flatten(1).all(1)
        return [start + int(i) for i in torch.nonzero(wrong).flatten()]

    def _finish(self, mr: MReq, *, deferred: bool = False) -> None:
        """vLLM finishes a request (stopped or aborted): request_finished with its blocks."""
        delay, params = self.sched.request_finished(mr.req, list(mr.blocks))
        assert params is None
        if mr in self.running:
            self.running.remove(mr)
        if delay:
            mr.status = "held"
            return
        mr.status = "gone"
        if deferred:
            self.deferred += mr.blocks
        else:
            self._free_blocks(mr.blocks)

    # -- requests ---------------------------------------------------------------------------

    _request_args = dict(prompt=prompts, lora=st.sampled_from([None, None, None, "A", "B"]),
                         salt=st.sampled_from([None, None, None, "x", "y"]), embeds=st.sampled_from([False] * 7 + [True]),
                         new_tokens=st.integers(1, 4), reuse=st.booleans())

    # No rule has a precondition: one that does nothing now is cheaper than the invalid examples
    # hypothesis makes when it cannot find an enabled rule.

    @rule(data=st.data())
    def another_request(self, data):  # (twice as likely as the other rules)
        self.new_request(**{k: data.draw(v, label=k) for k, v in self._request_args.items()}, data=data)

    @rule(data=st.data(), **_request_args)
    def new_request(self, prompt, lora, salt, embeds, new_tokens, reuse, data):
        if len(self._live()) >= MAX_LIVE:
            return
        earlier = [m for m in reversed(self.all) if not m.embeds]  # the latest first
        if earlier and data.draw(st.booleans(), label="follow-up"):
            # Another turn of an earlier conversation: its identity, a prefix of its tokens, more.
            like = data.draw(st.sampled_from(earlier), label="like")
            toks = like.req.all_token_ids
            cut = data.draw(st.sampled_from([len(toks), len(toks) - 1, len(toks) // T * T, len(toks) // 2]), label="cut")
            prompt = (toks[:cut] + prompt[:data.draw(st.integers(0, 8), label="more")]) or prompt
            lora = like.req.lora_request.lora_name if like.req.lora_request is not None else None
            salt = like.req.cache_salt
        gone = sorted(rid for rid, m in self.current.items() if m.status == "gone")
        rid = data.draw(st.sampled_from(gone)) if reuse and gone else f"r{next(self.rid_counter)}"
        lora_request = None
        if lora is not None:
            lora_request = SimpleNamespace(lora_name=lora, lora_path=self.lora_dirs[lora], lora_int_id=1 + (lora == "B"))
        req = Req(request_id=rid, all_token_ids=list(prompt), num_computed_tokens=0,
                  prompt_embeds=torch.zeros(len(prompt), 4) if embeds else None, mm_features=[],
                  lora_request=lora_request, cache_salt=salt, block_hashes=[])
        if embeds:  # its KV depends on embeddings, not on the tokens: no other request's
            ident = ("embeds", next(self.embeds_counter))
        else:
            ident = (lora, self.lora_version[lora] if lora else 0, salt)
        mr = MReq(req, ident, len(prompt) + new_tokens, embeds)
        self.all.append(mr)
        self.current[rid] = mr
        self.by_obj[id(req)] = mr

    def _idle_adapters(self) -> list[str]:
        """Adapters some request used, that no waiting or running request uses (one that does
        would mix two adapters' KV)."""
        ever = {m.req.lora_request.lora_name for m in self.all if m.req.lora_request is not None}
        used = {m.req.lora_request.lora_name for m in self._live() if m.req.lora_request is not None}
        return sorted(ever - used)

    @rule(data=st.data())
    def rewrite_adapter(self, data):
        """The adapter's file is rewritten in place: another identity from now on."""
        if not self._idle_adapters():
            return
        name = data.draw(st.sampled_from(self._idle_adapters()), label="adapter")
        self.lora_version[name] += 1
        self._write_adapter(name)

    # -- scheduling (vLLM's schedule(), before build_connector_meta) ----------------------------

    @staticmethod
    def _chunk(data, left: int) -> int:
        """Tokens to compute this step: mostly all that are left (chunked prefill otherwise)."""
        return left if data.draw(st.booleans(), label="all tokens") else data.draw(st.integers(1, left), label="chunk")

    def _donors(self, mr: MReq) -> list[tuple[MReq, int]]:
        """Requests whose leading blocks vLLM's prefix cache would give ``mr``, and how many."""
        if mr.embeds:
            return []
        out = []
        for d in self.running:
            if d is mr or d.embeds or d.stale or d.ident != mr.ident:
                continue
            entry = self._in_batch(d)
            cached = (d.ncomp + (entry.chunk if entry else 0)) // T  # vLLM caches blocks as it allocates them
            k = min(cached, _common(d.req.all_token_ids, mr.req.all_token_ids) // T, (mr.req.num_tokens - 1) // T)
            while k and self.known_bad.intersection(d.blocks[:k]):
                k -= 1
            if k:
                out.append((d, k))
        return out

    def _can_schedule_waiting(self) -> bool:
        return self.e is not None and self.built is None and not self.batch_preempted and bool(self._waiting())

    @rule(data=st.data())
    def schedule_waiting(self, data):
        """One waiting request scheduled: the rest of the step comes with the next step rule."""
        if self._can_schedule_waiting():
            self._schedule_waiting(data)

    def _schedule_waiting(self, data, mr: MReq | None = None):
        if mr is None:
            mr = data.draw(st.sampled_from(self._waiting()), label="request")
        local, shared, donor = 0, [], None
        donors = self._donors(mr)
        if donors and data.draw(st.booleans(), label="share"):
            donor, kmax = data.draw(st.sampled_from(donors), label="donor")
            k = data.draw(st.integers(1, kmax), label="shared blocks")
            local, shared = k * T, donor.blocks[:k]
        n, load_async = self.sched.get_num_new_matched_tokens(mr.req, local)
        assert load_async is False and n is not None, (n, load_async)
        assert 0 <= n <= mr.req.num_tokens - 1 - local, f"{mr}: a hit of {n} tokens from {local}"
        if mr.embeds:
            assert n == 0, f"{mr}: a request with prompt embeddings got a hit"
        mode = data.draw(st.sampled_from(["full", "full", "full", "zero", "fewer", "unallocated"]), label="alloc")
        if mode == "unallocated":  # vLLM could not allocate: it asks again at a later step
            return
        ext = n if mode == "full" else 0 if mode == "zero" else (data.draw(st.integers(1, n - 1)) if n > 1 else n)
        start = local + ext
        chunk = self._chunk(data, mr.req.num_tokens - start)
        need = _ceil(start + chunk, T) - len(shared)
        if need > len(self.free):
            return  # allocation failed: not scheduled
        for b in shared:
            self.refs[b] += 1
        mr.blocks = shared + self._alloc(need)
        blocks = list(mr.blocks)
        self.sched.update_state_after_alloc(mr.req, SimpleNamespace(get_block_ids=lambda: (blocks,)), ext)
        if ext:
            sources = self.sched.get_external_cache_hit_sources(mr.req, ext)
            assert sum(sources.values()) == ext, (sources, ext)
        mr.req.num_computed_tokens = start
        mr.status = "running"
        mr.stale = False
        self.running.append(mr)
        self.batch.append(Entry(mr, chunk, local, ext, start, donor.rid if donor else None, waiting=True))

    def _runnable(self) -> list[MReq]:
        if self.e is None or self.built is not None:
            return []
        return [m for m in self.running if self._in_batch(m) is None and m.ncomp < m.req.num_tokens
                and not self._context_bad(m)]

    def _schedule_running(self, data, mr: MReq | None = None):
        if mr is None:
            mr = data.draw(st.sampled_from(self._runnable()), label="request")
        chunk = self._chunk(data, mr.req.num_tokens - mr.ncomp)
        need = _ceil(mr.ncomp + chunk, T) - len(mr.blocks)
        while need > len(self.free):  # as vLLM: preempt the last running request to make room
            victims = [m for m in self.running if m is not mr and self._in_batch(m) is None]
            if not victims or any(e.waiting for e in self.batch):
                return
            self._preempt(victims[-1])
            self.batch_preempted = True
        if need > 0:
            mr.blocks += self._alloc(need)
        self.batch.append(Entry(mr, chunk, start=mr.ncomp))

    def _preemptible(self) -> list[MReq]:
        if self.e is None or self.built is not None or any(e.waiting for e in self.batch):
            return []
        return [m for m in self.running if self._in_batch(m) is None]

    def _preempt(self, mr: MReq) -> None:
        self.running.remove(mr)
        self._free_blocks(mr.blocks)
        mr.blocks = []
        mr.req.num_computed_tokens = 0
        mr.status = "waiting"
        mr.stale = False
        self.preempted_ids.add(mr.rid)

    def _abortable(self) -> list[MReq]:
        if self.e is None:
            return []
        donors = {e.donor for e in self.batch}  # (vLLM never aborts inside schedule(): not those)
        return [m for m in self._live() if m.rid not in donors]

    @rule(data=st.data())
    def abort(self, data):
        """A request finished or aborted: waiting (maybe a pinned hit), in the step being scheduled
        (its load planned), in the step built and not run yet (its load or save sent), or running."""
        if not self._abortable() or data.draw(st.booleans(), label="not now"):
            return  # (half as likely as the other rules: the step finishes requests too)
        self._abort(data.draw(st.sampled_from(self._abortable()), label="request"))

    def _abort(self, mr: MReq) -> None:
        entry = self._in_batch(mr)
        if entry is not None:
            self.batch.remove(entry)
        in_built = self.built is not None and any(e.mr is mr for e in self.built.entries)
        if in_built:
            self.built.aborted.add(mr.rid)
        self._finish(mr, deferred=in_built)

    # -- reset -------------------------------------------------------------------------------

    @rule(preempt_running=st.booleans(), reset_connector=st.sampled_from([False, False, True]))
    def reset_prefix_cache(self, preempt_running, reset_connector):
        """vLLM's reset_prefix_cache(reset_running_requests, reset_connector), between steps (with
        async scheduling, while a built step is in flight): with reset_connector after new weights
        (a new generation: KV computed before is wrong now)."""
        if self.batch:
            return
        if preempt_running and self.built is None:
            for mr in list(reversed(self.running)):
                self._preempt(mr)
        if not reset_connector:
            return
        busy = [s for s in self.sched._reqs.values()
                if s is not None and s.phase in (LoadPhase.PLANNED, LoadPhase.LOADING)]
        ok = self.sched.reset_cache()
        if not ok:
            assert busy, "reset_cache refused with no load planned or in flight"
            return
        self.gen += 1
        assert self.store.epoch not in self.epoch_gen, "reset_cache kept an epoch"
        self.epoch_gen[self.store.epoch] = self.gen
        for mr in self.current.values():
            if mr.status in ("running", "held") and (mr.ncomp or mr.blocks):
                mr.stale = True

    # -- the step -----------------------------------------------------------------------------

    def build(self, block_state: bool) -> None:
        """End of vLLM's schedule(): build_connector_meta, then num_computed_tokens advance."""
        self._register()
        scheduled = {e.mr.rid: e.chunk for e in self.batch}
        state = None
        if block_state:  # vLLM 0.32 hands the step's block ids to the connector
            state = SimpleNamespace(get_block_ids=lambda rid: (list(self.current[rid].blocks),)
                                    if rid in scheduled else None)
        out = SimpleNamespace(num_scheduled_tokens=dict(scheduled), total_num_scheduled_tokens=sum(scheduled.values()),
                              kv_connector_block_state=state, preempted_req_ids=set(self.preempted_ids),
                              finished_req_ids=set())
        meta = self.sched.build_connector_meta(out)
        self._check_meta(meta)
        for e in self.batch:
            e.mr.req.num_computed_tokens += e.chunk
        self.built = Step(list(self.batch), meta)
        self.batch, self.preempted_ids, self.batch_preempted = [], set(), False

    def _check_meta(self, meta) -> None:
        by_rid = {e.mr.rid: e for e in self.batch}
        loads = {}
        for job in meta.loads:
            assert job.job_id not in self.jobs, f"job id {job.job_id} reused"
            self.jobs[job.job_id] = ("load", job.req_id)
            e = by_rid.get(job.req_id)
            assert e is not None and e.ext, f"a load for {job.req_id}, which vLLM does not load for this step"
            assert job.req_id not in loads, f"two loads for {job.req_id}"
            loads[job.req_id] = job
            first, last = e.local // T, _ceil(e.local + e.ext, T)
            assert job.block_ids == e.mr.blocks[first:last], \
                f"{e.mr}: load into blocks {job.block_ids}, vLLM allocated {e.mr.blocks[first:last]} for it"
            want = [min(T, e.local + e.ext - i * T) for i in range(first, last)]
            assert job.num_tokens == want, f"{e.mr}: load of {job.num_tokens} tokens per block, expected {want}"
        for e in self.batch:
            assert not e.ext or e.mr.rid in loads, (
                f"{e.mr}: vLLM counts {e.ext} tokens from {e.local} as loaded this step (update_state_after_alloc), "
                f"but the step's metadata has no load for it")
        for job in meta.saves:
            assert job.job_id not in self.jobs, f"job id {job.job_id} reused"
            self.jobs[job.job_id] = ("save", job.req_id)
            mr = self.current.get(job.req_id)
            assert mr is not None and mr.status in ("running", "held") and not mr.embeds, f"a save for {mr or job.req_id}"
            assert set(job.block_ids) <= set(mr.blocks), f"{mr}: save of blocks {job.block_ids} it does not hold"
            assert len(set(job.slots)) == len(job.slots)
        for rid in meta.release:
            assert self.current[rid].status == "held", f"release of {self.current[rid]}, not finished"

    def _step(self, data) -> None:
        """A whole schedule(): running requests first (each run, skipped or preempted), then waiting
        ones unless something was preempted; then the step is built and, mostly, run."""
        for mr in list(self.running):
            if self._in_batch(mr) is not None or mr.status != "running":
                continue
            choice = data.draw(st.sampled_from(["run", "run", "run", "skip", "preempt"]), label=f"{mr.rid}")
            if choice == "run" and mr in self._runnable():
                self._schedule_running(data, mr)
            elif choice == "preempt" and mr in self._preemptible():
                self._preempt(mr)
                self.batch_preempted = True
        if not self.batch_preempted:
            for mr in self._waiting():
                if data.draw(st.sampled_from([True, True, False]), label=f"schedule {mr.rid}"):
                    self._schedule_waiting(data, mr)
        self._maybe_abort(data, [e.mr for e in self.batch], "abort one just scheduled (its load planned)")
        self.build(block_state=data.draw(st.booleans(), label="block state"))
        self._maybe_abort(data, [e.mr for e in self.built.entries], "abort one just sent (its load or save sent)")
        if data.draw(st.integers(0, 3), label="run it now") or not self.built.entries:
            self.execute(data)

    def _maybe_abort(self, data, among: list[MReq], label: str) -> None:
        cands = [m for m in among if m in self._abortable()]
        if cands and data.draw(st.integers(0, 5), label=label) == 0:
            self._abort(data.draw(st.sampled_from(cands), label="request"))

    @rule(data=st.data())
    def step(self, data):
        """Run the step built (and not run yet), or schedule, build and (mostly) run one."""
        if self.built is not None:
            self.execute(data)
        elif any(m.status != "gone" for m in self.current.values()):
            self._step(data)

    @rule(data=st.data())
    def another_step(self, data):  # (three times as likely as the other rules)
        self.step(data)

    @rule(data=st.data())
    def third_step(self, data):
        self.step(data)

    @rule(data=st.data())
    def fourth_step(self, data):
        self.step(data)

    def execute(self, data):
        step, meta = self.built, self.built.meta
        tp, workers, kvs = self.tp, self.e.workers, self.e.kvs
        forward = bool(step.entries)
        sync_loads = any(e.ext for e in step.entries)  # vLLM's has_sync_kv_loads
        spec = forward and data.draw(st.booleans(), label="speculative-decoding order")
        hooks = forward and (sync_loads or data.draw(st.booleans(), label="per-layer hooks"))
        # which loaded blocks fail, on which ranks
        fails: set[tuple[int, int]] = set()
        loaded = [b for job in meta.loads for b in job.block_ids]
        if loaded and data.draw(st.integers(0, 3), label="fail?") == 0:
            block = data.draw(st.sampled_from(loaded), label="failing block")
            for rank in data.draw(st.sampled_from([[0], [tp - 1], list(range(tp))]), label="failing ranks"):
                fails.add((rank, block))
        FAIL.clear()
        for rank, block in fails:
            FAIL.setdefault(self.ptr_of_rank[rank], set()).add(block)
        self._register()

        self._progress(data, "saves written before the step")
        metas = [copy.deepcopy(meta) for _ in range(tp)]  # each worker gets its own copy, as over RPC
        for rank in range(tp):
            for job in metas[rank].saves:
                self.open_saves[rank][job.job_id] = job.req_id
            workers[rank].handle_preemptions(metas[rank])

        def start_load():
            for rank in range(tp):
                workers[rank].start_load(metas[rank])
                self.started[rank].update(job.job_id for job in metas[rank].loads)

        if sync_loads:
            start_load()
        wrong_at_wait: set[int] = set()
        tainted = {id(e): False for e in step.entries}
        with torch.inference_mode():
            for layer, name in enumerate(NAMES if forward else ()):
                if hooks:
                    for rank in range(tp):
                        workers[rank].wait_for_layer(name)
                    for e in step.entries:  # what this layer's attention reads: loaded by now?
                        if e.ext:
                            bad = self._wrong_positions(e.mr, e.local, e.local + e.ext, layer)
                            wrong_at_wait.update(e.mr.blocks[p // T] for p in bad)
                for e in step.entries:  # the forward pass writes the KV of the tokens it computes
                    if e.chunk:
                        truth = e.mr.truth(self.gen, tp)
                        vals = truth.bad if tainted[id(e)] else truth.good
                        pos = torch.arange(e.start, e.start + e.chunk)
                        blocks = torch.tensor([e.mr.blocks[p // T] for p in range(e.start, e.start + e.chunk)])
                        for rank in range(tp):
                            kvs[rank][name][blocks, :, pos % T] = vals[layer][rank][e.start:e.start + e.chunk]
                for e in step.entries:  # attention over the context: wrong context, wrong KV from here on
                    if not tainted[id(e)] and self._wrong_positions(e.mr, 0, e.start + e.chunk, layer):
                        tainted[id(e)] = True
                if hooks:
                    for rank in range(tp):
                        workers[rank].save_layer(name, metas[rank])
            if not sync_loads:
                start_load()
            self._progress(data, "saves written after the forward pass")
            results = []
            if spec:
                results = [self._results(rank) for rank in range(tp)]
                self._wait_for_save(metas)
            else:
                self._wait_for_save(metas)
                results = [self._results(rank) for rank in range(tp)]
        FAIL.clear()

        # As vLLM's KVOutputAggregator.
        finished, errors, wm = set(), set(), None
        for fin, errs, m in results:
            for rid in fin or ():
                left = self.finished_count.get(rid, tp) - 1
                if left:
                    self.finished_count[rid] = left
                else:
                    self.finished_count.pop(rid, None)
                    finished.add(rid)
            errors |= errs
            if wm is None:
                wm = m
            elif m is not None:
                wm = wm.aggregate(m)
        for rank in range(tp):
            want = {b for r, b in fails if r == rank}
            got = results[rank][1]
            assert got == want, f"rank {rank} reported load errors {sorted(got)}; the blocks that failed: {sorted(want)}"
        for b in set(loaded) - errors:
            assert b not in wrong_at_wait, (
                f"block {b} was loaded with wrong KV (or not yet) when its layer was waited for, and not reported")

        # vLLM's update_from_output: load errors, then finished requests, then the connector's output.
        affected = self._invalid_blocks(errors, step)
        self.known_bad |= errors
        for e in step.entries:
            mr = e.mr
            if mr.status != "running" or mr.rid in affected or mr.rid in step.aborted:
                continue
            if mr.ncomp >= mr.req.num_tokens:  # the whole sequence is computed: a token is sampled
                toks = mr.req.all_token_ids
                toks.append((sum(toks[-3:]) + len(toks)) % ALPHABET)
                if len(toks) >= mr.max_len:
                    self._finish(mr)
        self.sched.update_connector_output(SimpleNamespace(kv_connector_worker_meta=wm, finished_sending=finished or None))
        for rid in finished:
            mr = self.current.get(rid)
            assert mr is not None and mr.status == "held", f"finished_sending names {mr or rid}, which vLLM does not hold"
            mr.status = "gone"
            self._free_blocks(mr.blocks)
        self._free_blocks(self.deferred)
        self.deferred = []
        self.built = None
        self._refresh_known_bad()
        self._check_computed()
        self._check_store({slot for job in meta.saves for slot in job.slots})

    def _progress(self, data, label: str) -> None:
        """Deferred saves (async_saves) are written now, or not yet."""
        pending = [w._pipe._save_worker for w in self.e.workers
                   if w._pipe is not None and isinstance(w._pipe._save_worker, Deferred) and w._pipe._save_worker.pending]
        if pending and (data is None or data.draw(st.booleans(), label=label)):
            for executor in pending:
                executor.run_all()

    def _wait_for_save(self, metas) -> None:
        for rank in range(self.tp):
            self.e.workers[rank].wait_for_save(metas[rank])
            for job in metas[rank].saves:
                self.open_saves[rank].pop(job.job_id, None)
                self.sealed[rank].add(job.job_id)

    def _results(self, rank: int):
        w = self.e.workers[rank]
        fin, errs, wm = w.get_finished(), w.load_errors(), w.take_worker_meta()
        writing = set(self.open_saves[rank].values())
        for rid in fin:
            mr = self.current.get(rid)
            assert mr is not None and mr.status == "held", f"rank {rank} released {mr or rid}, which is not finished"
            assert rid not in writing, f"rank {rank} released {rid} while a save of it is being written"
        if wm is not None:
            assert not wm.unsaved, f"rank {rank}: saves {wm.unsaved} not written (no encode fault injected)"
            for job_id, n in wm.done.items():
                assert n == 1 and job_id in self.jobs, (job_id, n)
                assert job_id not in self.reported[rank], f"rank {rank} reported job {job_id} done twice"
                self.reported[rank].add(job_id)
                kind = self.jobs[job_id][0]
                if kind == "save":
                    assert job_id in self.sealed[rank], f"rank {rank} reported save {job_id} done before wait_for_save"
                else:
                    assert job_id in self.started[rank], f"rank {rank} reported load {job_id} done before it started"
            for job_id in wm.failed:
                assert self.jobs.get(job_id, ("?",))[0] == "load", f"failed blocks reported for job {job_id}"
        return fin, errs, wm

    def _invalid_blocks(self, invalid: set[int], step: Step) -> set[str]:
        """vLLM's Scheduler._update_requests_with_invalid_blocks (recompute policy) over its running
        queue. The blocks from a request's first failed one on (what vLLM would evict with the "fail"
        policy) are wrong until that request recomputes them: known bad."""
        if not invalid:
            return set()
        chunk = {e.mr.rid: e.chunk for e in step.entries}
        marked, affected = set(), set()
        for mr in self.running:
            pre = mr.ncomp - chunk.get(mr.rid, 0)
            is_affected = marked_here = False
            for idx, b in zip(range(_ceil(pre, T)), mr.blocks):
                if b not in invalid:
                    continue
                is_affected = True
                if b in marked:
                    continue
                marked.add(b)
                if marked_here:
                    continue
                marked_here = True
                mr.req.num_computed_tokens = idx * T
                self.known_bad.update(mr.blocks[idx:])
            if is_affected:
                if not marked_here:
                    mr.req.num_computed_tokens = pre
                affected.add(mr.rid)
        return affected

    def _refresh_known_bad(self) -> None:
        for b in list(self.known_bad):
            holders = [(m, m.blocks.index(b)) for m in self.running if b in m.blocks and not m.stale]
            spans = [(m, i * T, min(m.ncomp, (i + 1) * T)) for m, i in holders if m.ncomp > i * T]
            if spans and all(not self._wrong_positions(m, s, t, layer) for m, s, t in spans for layer in range(LAYERS)):
                self.known_bad.discard(b)

    # -- invariants ---------------------------------------------------------------------------

    def _check_computed(self) -> None:
        """Every computed position of a running request holds its KV, but blocks vLLM recomputes."""
        for mr in self.running:
            if mr.stale:
                continue
            for layer in range(LAYERS):
                wrong = [p for p in self._wrong_positions(mr, 0, mr.ncomp, layer)
                         if mr.blocks[p // T] not in self.known_bad]
                assert not wrong, (f"{mr}: computed positions {wrong[:8]} (blocks "
                                   f"{sorted({mr.blocks[p // T] for p in wrong})}) hold wrong KV at layer {layer}")

    def _register(self) -> None:
        """What each key the scheduler half can store means: chained from each request state's root,
        for every prefix of its tokens (full blocks and partial tails)."""
        for st_ in list(self.sched._reqs.values()):
            if st_ is None:
                continue
            mr = self.by_obj.get(id(st_.request))
            assert mr is not None and not mr.embeds, f"a request state for {mr}"
            gen = self.epoch_gen.get(st_.epoch)
            assert gen is not None, "a request state under an epoch no reset made"
            held = self.reg_upto.get(id(st_))
            _, nfull, parent, tail = held if held is not None and held[0] is st_ else (st_, 0, st_.root, 0)
            tokens = st_.request.all_token_ids
            n = len(tokens)
            while True:
                base = nfull * T
                upto = min(T, n - base)
                for m in range(tail + 1, upto + 1):
                    key = block_key(parent, tokens_array(tokens[base:base + m]))
                    meaning = (mr.ident, gen, tuple(tokens[:base + m]))
                    old = self.registry.setdefault(key, meaning)
                    assert old == meaning, f"one key for two meanings: {old[:2]} and {meaning[:2]}"
                if upto < T:
                    tail = max(tail, upto)
                    break
                parent, nfull, tail = block_key(parent, tokens_array(tokens[base:base + T])), nfull + 1, 0
            self.reg_upto[id(st_)] = (st_, nfull, parent, tail)

    def _expect(self, key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        got = self.slot_expect.get(key)
        if got is not None:
            return got
        ident, gen, toks = self.registry[key]
        i = (len(toks) - 1) // T
        m = len(toks) - i * T
        seeds, _ = _seeds(ident, gen, toks)
        seeds = seeds[i * T:]
        parts, masks = [], []
        for rank in range(self.tp):
            for layer in range(LAYERS):
                full = torch.zeros(2, T, H, D, dtype=torch.bfloat16)
                full[:, :m] = _values(seeds, _salt(layer, rank)).permute(1, 0, 2, 3)
                mask = torch.zeros(2, T, H, D, 2, dtype=torch.bool)
                mask[:, :m] = True
                parts.append(full.contiguous().view(torch.uint8).flatten())
                masks.append(mask.flatten())
        got = self.slot_expect[key] = (torch.cat(parts), torch.cat(masks))
        return got

    def _check_store(self, written: set[int]) -> None:
        """Every block visible in the store holds the KV of its key's tokens and identity (checked
        when it becomes visible, and again whenever a save of the step wrote its slot)."""
        buf, bb = self.store.cpu.buffer, self.e.geo.block_bytes
        for key, res in list(self.store._resident.items()):
            if not res.visible or (self.verified.get(key) == res.slot and res.slot not in written):
                continue
            meaning = self.registry.get(key)
            assert meaning is not None, "a visible block that no request's key chain explains"
            exp, mask = self._expect(key)
            got = buf[res.slot, :bb]
            if not torch.equal(got[mask], exp[mask]):
                ident, gen, toks = meaning
                raise AssertionError(f"the stored block of {len(toks)} tokens under identity {ident}, generation "
                                     f"{gen} (slot {res.slot}) does not hold their KV")
            self.verified[key] = res.slot

    @invariant()
    def keys_mean_one_thing(self):
        if self.e is not None:
            self._register()

    @invariant()
    def nothing_held_when_idle(self):
        """Every request released and no job in flight (a load may be reported done after its
        request was released: its writes are over, its slots are unpinned when it is)."""
        if self.e is None or self.built is not None or self.batch or len(self.sched._jobs):
            return
        if any(m.status != "gone" for m in self.current.values()):
            return
        self._assert_idle()

    def _assert_idle(self) -> None:
        assert len(self.sched._jobs) == 0, f"jobs left: {[(j.job_id, j.state.req_id) for j in self.sched._jobs]}"
        pinned = self.store.stats()["cpu"]["pinned_blocks"]
        assert pinned == 0, f"{pinned} blocks pinned with no request left"
        storing = sum(b.state is BlockState.STORING for b in self.store._resident.values())
        assert not storing, f"{storing} slots reserved for saves never completed or aborted"
        leaked = self.store.cpu.num_slots - self.store.cpu.num_free - len(self.store._resident)
        assert not leaked, f"{leaked} CPU slots allocated to no block"
        assert not self.sched._reqs, f"request states left: {list(self.sched._reqs)}"

    @rule(now=st.integers(0, 2))
    def drain(self, now=0):
        """Every request finished; steps without tokens until kvplug gave every block back."""
        if now or self.built is not None or all(m.status == "gone" for m in self.current.values()):
            return  # (a third as likely as the other rules)
        for e in list(self.batch):
            self.batch.remove(e)
        for mr in self._live():
            self._finish(mr)
        for i in range(200):  # (transfers finish on the pipeline threads: a few steps, a few ms)
            if i and not any(m.status == "held" for m in self.current.values()) and not len(self.sched._jobs):
                break
            if i > 4:
                time.sleep(0.005)
            self._progress(None, "")
            self.build(block_state=False)
            self.execute(_NoDraws())
        held = [m for m in self.current.values() if m.status == "held"]
        assert not held, f"finished requests never released: {held}"
        self._assert_idle()
        assert not self.sched._planned and not self.sched._tails and not self.sched._release
        for rank in range(self.tp):
            missing = set(self.jobs) - self.reported[rank]
            assert not missing, f"rank {rank} never reported jobs {sorted(missing)}"


class _NoDraws:
    """st.data() for the steps drain runs (vLLM's kv_connector_no_forward: no tokens, nothing to choose)."""

    def draw(self, strategy, label=None):
        if (label or "").startswith("saves written"):
            return True  # drain lets deferred saves be written
        raise AssertionError("a step without tokens draws no other choice")


TestHalvesStateMachine = HalvesMachine.TestCase
# Shrinking a failure takes minutes (hypothesis stops after five): opt in with KVPLUG_SM_SHRINK=1.
# Unshrunk, a failure still says what went wrong, and the database replays it on the next run.
TestHalvesStateMachine.settings = settings(
    max_examples=50, stateful_step_count=50, deadline=None,
    phases=list(Phase) if os.environ.get("KVPLUG_SM_SHRINK") else [Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


# -- what the machine found, as plain cases ------------------------------------------------------


def test_a_request_preempted_by_reset_prefix_cache_is_loaded_when_scheduled_again(tmp_path):
    """vLLM's reset_prefix_cache(reset_running_requests=True) preempts every running request outside
    schedule(), so the next schedule() may schedule one again, with a kvplug hit, in the step whose
    preempted_req_ids names it: vLLM counts the hit as loaded in that step."""
    e = Engine(tmp_path)
    try:
        a = e.request("a", list(range(100, 148)))  # 3 full blocks
        e.schedule(a)
        e.step({a: 48})
        a.num_computed_tokens = 0                   # preempted: its blocks freed
        e.blocks["a"] = [20, 21, 22]
        n, _ = e.sched.get_num_new_matched_tokens(a, 0)
        assert n == 47
        e.sched.update_state_after_alloc(a, SimpleNamespace(get_block_ids=lambda: ([20, 21, 22],)), n)
        meta = e.sched.build_connector_meta(SimpleNamespace(
            num_scheduled_tokens={"a": 1}, total_num_scheduled_tokens=1, kv_connector_block_state=None,
            preempted_req_ids={"a"}))
        assert [(job.req_id, job.block_ids) for job in meta.loads] == [("a", [20, 21, 22])]
    finally:
        e.close()


def test_a_request_finished_with_its_load_planned_stores_nothing_it_did_not_load(tmp_path):
    """request_finished after update_state_after_alloc and before build_connector_meta (a load
    planned, not sent) drops the load: the tokens vLLM counted as loaded are in no block."""
    e = Engine(tmp_path)
    try:
        tokens = list(range(100, 140))
        a = e.request("a", tokens)
        e.schedule(a)
        e.step({a: 40})
        b = e.request("b", tokens[:10] + [7] * 10)  # shares 10 tokens of a's block 0
        for name in NAMES:
            e.kv[name][e.blocks["b"]] = GARBAGE       # what b's fresh blocks hold: not its KV
        assert e.schedule(b) == 10
        key = block_key(e.sched._reqs["b"].root, tokens_array(tokens[:10]))
        e.sched.request_finished(b, e.blocks["b"])
        e.step({})
        block = e.sched.store._resident.get(key)
        assert block is None or not block.visible, "b's block 0, never loaded, is stored as its first 10 tokens"
    finally:
        e.close()
