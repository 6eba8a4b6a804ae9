"""The halves state machine's step: build_connector_meta, the forward pass on every rank layer by
layer in vLLM's call orders, then vLLM's update with load errors and finished transfers."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
from hypothesis import strategies as st
from hypothesis.stateful import rule

from halves_world import ALPHABET, Deferred, FAIL, LAYERS, MReq, Step, _ceil
from test_halves import NAMES, T


class StepRules:
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
