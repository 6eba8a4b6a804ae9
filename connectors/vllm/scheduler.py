"""Scheduler half: lookups, load plans, what to save, and the store's two phases.

Runs in vLLM's EngineCore process and owns the TieredStore. Per request it
keeps a ``RequestState`` (request_state.py: key chain, load phase); every
transfer in flight is a job (jobs.py). The worker only copies bytes; nothing
becomes visible in the store until every worker says its bytes are written,
and nothing pinned is unpinned before every worker is done.

A request's blocks are keyed from its own root (identity.py: LoRA, salt, epoch);
a request kvplug cannot key (prompt embeddings, multimodal) is skipped. With
load_policy=auto a hit loads only where LoadPolicy says it beats recomputing.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter, deque

from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvplug.blocks import StoreEntry
from kvplug.config import KVPlugConfig
from kvplug.policy import LoadPolicy
from kvplug.store import TieredStore
from kvplug.tiers.cpu import CPUTier

from .geometry import Geometry
from .identity import Unkeyable, request_identity, request_root
from .jobs import Job, JobTable
from .kv_events import KVEventLog
from .metadata import KVPlugMetadata, KVPlugWorkerMetadata, LoadJob, SaveJob
from .remote_lookup import RemoteLookups
from .request_state import LoadPhase, RequestState
from .ssd_promotions import SSDPromotions
from .stats import KVPlugStats, TierBytes

log = logging.getLogger("vllm.kvplug")  # under vLLM's logger: its handlers and format


class SchedulerHalf:
    def __init__(self, config: KVPlugConfig, geo: Geometry, *, engine_id: str = "engine", kv_events: bool = False):
        self.config = config
        self.geo = geo
        self.T = geo.block_tokens
        self.store = TieredStore(config, geo.layout, geo.block_bytes, geo.root,
                                 name=CPUTier.unique_name(f"kvplug-{engine_id}"), events=kv_events)
        self._events = KVEventLog(self.T) if kv_events else None
        self.stats = KVPlugStats()
        self._tier_bytes = TierBytes(self.store)
        self.policy = LoadPolicy(config.load_policy)
        self.remote = None if self.store.remote is None else \
            RemoteLookups(self.store, self.policy, self.stats, config, self.T, geo.block_bytes)
        self.promotions = SSDPromotions(self.store, self.policy, self.stats, config, geo.block_bytes)
        # (start, tokens) of each step in flight, oldest first (async scheduling builds step N+1
        # before step N's output arrives): prefill speed from the prefill-sized ones
        self._steps: deque[tuple[float, int]] = deque()
        self._skip_warned: set[str] = set()
        self._reqs: dict[str, RequestState | None] = {}  # None: a request kvplug cannot key
        self._planned: list[RequestState] = []
        self._jobs = JobTable(geo.tp_size)  # each job is done once every tensor-parallel worker reports it
        self._tails: list[SaveJob] = []     # partial tails of finished requests, for the next step
        self._release: list[str] = []       # finished requests vLLM holds blocks of for us
        self._attached = 0

    # -- lookup -----------------------------------------------------------------

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        st = self._state(request, num_computed_tokens)
        if getattr(request, "skip_reading_prefix_cache", False):
            return 0, False  # vLLM discards any hit for it: look nothing up, fetch nothing (its KV is still saved)
        if st is None or st.epoch != self.store.epoch or st.phase is LoadPhase.LOADING or st.gave_up:
            return 0, False  # unkeyable, from before a reset, its last load in flight, or it gave up: recompute
        if st.phase is LoadPhase.PLANNED or (st.phase is LoadPhase.PINNED and st.lookup_from != num_computed_tokens):
            self._drop(st)  # preempted before its plan went out, or vLLM's own prefix cache moved on
        if st.phase is LoadPhase.NONE and not (pinned := self._pin_hit(st, request, num_computed_tokens)):
            return (None if pinned is None else 0), False  # None: a remote fetch is in flight
        if self.promotions.waiting(st):
            return None, False  # SSD blocks are being promoted: ask again next step, others run meanwhile
        if st.gave_up:  # past the deadline: recompute
            self._drop(st)
            return 0, False
        if st.handle.failed:
            # Keep only the readable prefix pinned: a failed block must be free to be
            # stored again once this request has recomputed it.
            failed, st.handle = st.handle, self.store.prepare_load(st.handle.loadable)
            self.stats.add("promotion_failed_blocks", len(failed.failed))
            self.store.complete_load(failed)
        num = st.handle.num_tokens
        if num < self.config.min_hit_tokens:
            self._drop(st)
            return 0, False
        return num, False

    def _pin_hit(self, st: RequestState, request, num_computed_tokens: int) -> bool | None:
        """True: a hit is pinned; False: nothing to load; None: wait for the remote tier."""
        cap = request.num_tokens - 1  # the last prompt token is always computed
        if num_computed_tokens % self.T or cap - num_computed_tokens < self.config.min_hit_tokens:
            return False
        hit = self.store.lookup(st.tokens(0, cap), st.root)
        if self.remote is not None and (fetched := self.remote.wait(st, hit, num_computed_tokens, cap)) is not False:
            if fetched is None:
                return None
            hit = self.store.lookup(st.tokens(0, cap), st.root)  # fetched blocks landed in the CPU tier
        if not st.looked_up:
            st.looked_up = True
            self.stats.add("lookups")
            self.stats.add("lookup_tokens", cap - num_computed_tokens)
        new = hit.num_tokens - num_computed_tokens
        if new < self.config.min_hit_tokens:
            return False
        refs = hit.blocks[num_computed_tokens // self.T:]
        if not self._worth_loading(new, refs):  # the SSD too slow (or still reading): the CPU blocks before it
            self.promotions.skipped(refs)
            refs = list(itertools.takewhile(lambda r: r.tier != "ssd", refs))
            kept = sum(r.num_tokens for r in refs)
            if kept == new or kept < self.config.min_hit_tokens or not self._worth_loading(kept, refs):
                kept = 0
            self.stats.add("policy_skipped_tokens", new - kept)
            if not kept:
                return False
        st.move(LoadPhase.PINNED)
        st.handle = self.store.prepare_load(refs)
        st.lookup_from = num_computed_tokens
        self.promotions.started(st)
        return True

    def _worth_loading(self, tokens: int, refs: list) -> bool:
        tiers = Counter(r.tier for r in refs)  # (no SSD load while it still reads one given up on)
        return not (tiers["ssd"] and self.promotions.suspect()) and self.policy.should_load(
            tokens, {t: n * self.geo.block_bytes for t, n in tiers.items()}, self.config.promotion_min_wait_s)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        st = self._reqs.get(request.request_id)
        if st is None or st.request is not request or st.phase is not LoadPhase.PINNED:
            return
        if num_external_tokens == 0:
            self._drop(st)
            return
        block_ids = blocks.get_block_ids()[0]
        start, end, T = st.lookup_from, st.lookup_from + num_external_tokens, self.T
        plan = LoadJob(-1, request.request_id, [], [], [])  # the job id is given when it goes out
        sources = Counter()
        for j, ref in enumerate(st.handle.loadable):
            i = start // T + j
            if i * T >= end:
                break
            n = min(T, end - i * T)
            plan.block_ids.append(block_ids[i])
            plan.slots.append(ref.slot)
            plan.num_tokens.append(n)
            sources[CacheHitSource.DISK if ref.tier == "ssd" else CacheHitSource.HOST] += n
        st.move(LoadPhase.PLANNED)
        st.plan, st.sources = plan, dict(sources)
        self._planned.append(st)
        self.stats.add("hit_tokens", num_external_tokens)
        self.stats.add("hit_tokens_cpu", sources[CacheHitSource.HOST])
        self.stats.add("hit_tokens_ssd", sources[CacheHitSource.DISK])

    def get_external_cache_hit_sources(self, request, num_external_tokens: int) -> dict[CacheHitSource, int]:
        st = self._reqs.get(request.request_id)
        return dict(st.sources) if st is not None and num_external_tokens else {}

    # -- the step ---------------------------------------------------------------

    def build_connector_meta(self, scheduler_output) -> KVPlugMetadata:
        meta = KVPlugMetadata(slab=(self.store.cpu.name, self.store.cpu.nonce))
        self._steps.append((time.monotonic(), scheduler_output.total_num_scheduled_tokens))
        self.promotions.observe_late()
        preempted = set(getattr(scheduler_output, "preempted_req_ids", None) or ())
        for st in self._planned:
            if st.phase is not LoadPhase.PLANNED:
                continue
            if st.req_id not in scheduler_output.num_scheduled_tokens:
                # Preempted later in the same schedule() (vLLM unschedules it): its blocks are
                # gone again, never write into them. (A request preempted outside schedule(), by
                # reset_prefix_cache, and scheduled again is named in preempted_req_ids too: its
                # plan stands, vLLM counts the hit as loaded.)
                self._drop(st)
                continue
            job = self._jobs.add(st, handle=st.handle, block_ids=st.plan.block_ids,
                                 first_block=st.lookup_from // self.T)
            st.plan.job_id = job.job_id
            meta.loads.append(st.plan)
            st.move(LoadPhase.LOADING)
            st.load_job, st.handle = job.job_id, job.handle
        self._planned = []

        block_state = scheduler_output.kv_connector_block_state
        for req_id, num_new in scheduler_output.num_scheduled_tokens.items():
            st = self._reqs.get(req_id)
            if st is None or st.epoch != self.store.epoch or st.tainted:
                continue
            req = st.request
            if req.mm_features or req.prompt_embeds is not None:  # a session that gained inputs kvplug cannot key
                st.tainted = True
                continue
            # Full blocks whose KV exists once this step has run.
            done = min(req.num_computed_tokens + num_new, req.num_tokens) // self.T
            if done > st.next_block:
                ids = (block_state.get_block_ids(req_id) if block_state is not None else None) or \
                    self._kv_cache_manager.get_block_ids(req_id)
                job = self._save_job(st, [(i, st.entry(i)) for i in range(st.next_block, done)], ids[0])
                if job is not None:
                    meta.saves.append(job)
                st.next_block = done

        meta.saves += self._tails
        meta.release = self._release
        meta.preempted = [r for r in preempted if (st := self._reqs.get(r)) is not None and st.saves]
        self._tails, self._release = [], []
        return meta

    def _save_job(self, st: RequestState, blocks: list[tuple[int, StoreEntry]], block_ids: list[int]) -> SaveJob | None:
        """Reserve slots for blocks (index in the request, entry); a job for those that need writing."""
        slots = self.store.prepare_store([e for _, e in blocks])
        picked = [(block_ids[i], slot, e.key) for (i, e), slot in zip(blocks, slots) if slot is not None]
        if self._events is not None:
            self._events.note(st.request, blocks, slots)
        self.stats.add("store_skipped_blocks", len(blocks) - len(picked))
        if not picked:
            return None
        last = blocks[-1][0]
        job = self._jobs.add(st, keys=[p[2] for p in picked], over=frozenset(block_ids[:last + 1]),
                             first_block=blocks[0][0], epoch=self.store.epoch)
        st.saves.add(job.job_id)
        return SaveJob(job.job_id, st.req_id, [p[0] for p in picked], [p[1] for p in picked])

    def update_connector_output(self, output) -> None:
        if self._steps:
            start, tokens = self._steps.popleft()
            if tokens >= self.T:  # a prefill-sized step
                self.policy.observe_prefill(tokens, time.monotonic() - start)
        wm = output.kv_connector_worker_meta
        if isinstance(wm, KVPlugWorkerMetadata):
            self._on_worker_meta(wm)
        for req_id in output.finished_sending or ():
            st = self._reqs.get(req_id)
            if st is not None and st.finished:
                del self._reqs[req_id]

    def _on_worker_meta(self, wm: KVPlugWorkerMetadata) -> None:
        if wm.attached:
            self._attached += wm.attached
            if self._attached >= self.geo.tp_size:
                # Every worker maps the slab now: drop its name so that even a kill -9 leaks nothing.
                self.store.cpu.unlink()
        for job_id, block_ids in wm.failed.items():  # before any completion: saves over them are poisoned
            self._on_load_failed(job_id, set(block_ids))
        for job_id in wm.unsaved:
            if (job := self._jobs.get(job_id)) is not None:
                job.unsaved = True
        for job_id, n in wm.done.items():
            job = self._jobs.report(job_id, n)
            if job is not None:
                self._complete(job)

    def _on_load_failed(self, job_id: int, failed: set[int]) -> None:
        """vLLM recomputes from the first failed block: store those blocks again, and
        never any block computed on top of the bad KV, whichever request computed it."""
        self.stats.add("load_failed_blocks", len(failed))
        job = self._jobs.get(job_id)
        owner = job.state if job is not None and job.is_load else None
        if owner is not None:  # vLLM rolls the owner back to its first failed block and recomputes
            bad = [j for j, b in enumerate(job.block_ids) if b in failed]
            owner.next_block = min(owner.next_block, job.first_block + min(bad, default=0))
        for poisoned in self._jobs.poison(failed):
            if poisoned.state is owner:
                owner.next_block = min(owner.next_block, poisoned.first_block)
            else:
                # Another request computed over the bad block (a vLLM prefix-cache hit on it);
                # vLLM may keep that KV as computed: it never saves again.
                poisoned.state.tainted = True

    def _complete(self, job: Job) -> None:
        st = job.state
        if job.is_load:
            self.stats.add("loaded_blocks", len(job.handle.loadable))
            self.store.complete_load(job.handle)
            if st.load_job == job.job_id:
                st.move(LoadPhase.NONE)
        else:
            st.saves.discard(job.job_id)
            if job.poisoned or job.unsaved or job.epoch != self.store.epoch:
                # Bytes missing, computed over a failed load, or from before a reset: never visible.
                self.store.abort_store(job.keys)
                self.stats.add("aborted_blocks", len(job.keys))
                if self._events is not None:
                    self._events.forget(job.keys)
            else:
                self.store.complete_store(job.keys)
                self.stats.add("stored_blocks", len(job.keys))

    def has_pending_block_frees(self) -> bool:
        """Finished requests whose blocks vLLM holds until their saves are written: under KV
        pressure vLLM may wait for them instead of preempting."""
        return any(st is not None and st.finished for st in self._reqs.values())

    def take_events(self) -> list:
        return [] if self._events is None else self._events.events(self.store.take_events())

    # -- finishing ----------------------------------------------------------------

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict | None]:
        st = self._reqs.get(request.request_id)
        if st is None or st.request is not request:
            if st is None:
                self._reqs.pop(request.request_id, None)  # an unkeyable request
            return False, None
        if st.phase is LoadPhase.PLANNED:
            # vLLM counted the hit as computed, but the load never went out: those tokens'
            # KV is in no block of this request, so none of it may be saved.
            st.tainted = True
        if st.phase in (LoadPhase.PINNED, LoadPhase.PLANNED):
            self._drop(st)
        if self.config.store_partial_blocks and st.epoch == self.store.epoch and not st.tainted:
            self._store_tail(st, block_ids)
        st.finished = True
        if st.busy():
            # The worker still reads (saves) or writes (loads) these blocks: vLLM
            # frees them once the worker reports the request in finished_sending.
            self._release.append(request.request_id)
            return True, None
        del self._reqs[request.request_id]
        return False, None

    def _store_tail(self, st: RequestState, block_ids: list[int]) -> None:
        req = st.request
        computed = min(req.num_computed_tokens, req.num_tokens - 1)  # the last sampled token has no KV
        i, rest = divmod(computed, self.T)
        if rest == 0 or st.next_block < i or i >= len(block_ids):
            return
        job = self._save_job(st, [(i, StoreEntry.of(st.parent(i), st.tokens(i * self.T, computed)))], block_ids)
        if job is not None:
            self._tails.append(job)

    # -- reset ------------------------------------------------------------------------

    def reset_cache(self) -> bool:
        """vLLM's reset_prefix_cache(reset_connector=True): a new epoch, every block dropped.
        Refused (False) while a load is planned or in flight: it would land after the reset."""
        if any(st is not None and st.phase in (LoadPhase.PLANNED, LoadPhase.LOADING) for st in self._reqs.values()):
            log.warning("kvplug: reset_cache refused while loads are in flight; retry once they finish")
            return False
        for st in self._reqs.values():
            if st is not None and st.phase is LoadPhase.PINNED:
                self._drop(st)
        self.store.reset()  # saves in flight are aborted when they complete (their epoch is old)
        self.stats.add("resets")
        log.info("kvplug: cache reset: a new epoch; nothing stored before is loaded again")
        return True

    # -- helpers --------------------------------------------------------------------

    _kv_cache_manager = None

    def bind_kv_cache_manager(self, kv_cache_manager) -> None:
        self._kv_cache_manager = kv_cache_manager  # block ids of requests, when vLLM offers none

    def _state(self, request, num_computed_tokens: int) -> RequestState | None:
        req_id = request.request_id
        st = self._reqs.get(req_id, False)
        if st is not False and (st is None or st.request is request):
            if st is None or st.epoch == self.store.epoch or num_computed_tokens or st.busy():
                return st
            # A request from before a reset (preempted by it) starts over: a state in this epoch.
        # New, or an id vLLM reuses for another request: the old state lives on in its jobs.
        try:
            identity = request_identity(request)
        except Unkeyable as why:
            self._reqs[req_id] = None
            self.stats.add("skipped_requests")
            self.stats.add(f"skipped_{why}")
            if str(why) not in self._skip_warned:
                self._skip_warned.add(str(why))
                log.warning("kvplug: requests with %s are neither stored nor loaded (counted in "
                            "vllm:kvplug_skipped_%s; logged once)", str(why).replace("_", " "), why)
            return None
        epoch = self.store.epoch
        st = RequestState(request, request_root(self.geo.root, epoch, identity), epoch, self.T)
        self._reqs[req_id] = st
        return st

    def _drop(self, st: RequestState) -> None:
        """Unpin a hit that will not be loaded."""
        if st.handle is not None:
            self.store.complete_load(st.handle)
        st.move(LoadPhase.NONE)

    def take_stats(self) -> KVPlugStats | None:
        self._tier_bytes.count(self.stats)
        return self.stats.take()

    def shutdown(self) -> None:
        for st in self._reqs.values():
            if st is not None and st.phase in (LoadPhase.PINNED, LoadPhase.PLANNED):
                self._drop(st)
        log.info("kvplug: store stats at shutdown: %s", self.store.stats())
        self.store.close()
