"""The halves state machine's set-up, requests and scheduling rules (vLLM's schedule() before
build_connector_meta): new requests, LoRA rewrites, preemption, aborts, reset_prefix_cache."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from types import SimpleNamespace

import torch
from hypothesis import strategies as st
from hypothesis.stateful import initialize, rule

from kvplug.connectors.vllm.request_state import LoadPhase
from kvplug.transfer import LayerPipeline
from kvplug.transfer_cpu import CPUPipeline
from halves_world import (DEFER_SAVES, FAIL, LAYERS, MAX_LIVE, NUM_BLOCKS, Entry, MReq, Req, Step, _ceil, _common,
                          _cpu_setup, _decode_rows, _failing_decode_rows, _names, _setup_deferring, prompts)
from test_halves import NAMES, Engine, T


class RequestRules:
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
