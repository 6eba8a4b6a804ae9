"""Scheduler half: lookups, load plans, what to save, and the store's two phases.

Runs in vLLM's EngineCore process and owns the TieredStore. Per request it
keeps the chained keys of the blocks it has seen, the pinned hit between the
lookup and the worker's copy, and the save jobs in flight. The worker only
copies bytes; nothing becomes visible in the store until the worker says its
bytes are written, and nothing pinned is unpinned before the worker is done.
With load_policy=auto a hit is loaded only when kvplug.policy.LoadPolicy says
loading beats recomputing, from prefill steps and SSD promotions it times.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import xxhash
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvplug.config import KVPlugConfig
from kvplug.keys import block_key, tokens_array
from kvplug.policy import LoadPolicy
from kvplug.blocks import LoadHandle, StoreEntry
from kvplug.store import TieredStore

from .geometry import Geometry
from .metadata import KVPlugMetadata, KVPlugWorkerMetadata, LoadJob, SaveJob
from .stats import KVPlugStats

log = logging.getLogger("vllm.kvplug")  # under vLLM's logger: its handlers and format


class _Req:
    """What the scheduler half tracks for one request."""

    def __init__(self, request, root: bytes, block_tokens: int):
        self.request = request
        self.root = root
        self.T = block_tokens
        self.keys: list[bytes] = []        # chained keys of full blocks 0..len-1
        self.next_block = 0                # first full block not yet offered to the store
        self.handle: LoadHandle | None = None  # pinned hit: from lookup until sent to the worker
        self.load_start = 0                # num_computed_tokens the hit was looked up from
        self.promoting = 0                 # SSD blocks of the hit being promoted
        self.asked = 0.0                   # when the hit was looked up
        self.looked_up = False             # lookup counted in stats
        self.plan: LoadJob | None = None   # allocated; goes out with this step's metadata
        self.sources: dict[CacheHitSource, int] = {}
        self.loading: LoadHandle | None = None  # sent to the worker, not reported back yet
        self.loaded_from = 0               # request block index of the first block loaded
        self.loaded_ids: list[int] = []    # vLLM blocks the last load filled
        self.saves: set[int] = set()       # save jobs in flight
        self.poisoned: set[int] = set()    # save jobs computed over a failed load: abort them

    def key(self, i: int) -> bytes:
        """Key of full block i (hashing the blocks before it once)."""
        for j in range(len(self.keys), i + 1):
            self.keys.append(block_key(self.parent(j), self.tokens(j * self.T, (j + 1) * self.T)))
        return self.keys[i]

    def parent(self, i: int) -> bytes:
        return self.key(i - 1) if i else self.root

    def tokens(self, start: int, end: int):
        return tokens_array(self.request.all_token_ids[start:end])

    def entry(self, i: int) -> StoreEntry:
        """Full block i."""
        return StoreEntry(self.key(i), self.parent(i), self.tokens(i * self.T, (i + 1) * self.T))


class SchedulerHalf:
    def __init__(self, config: KVPlugConfig, geo: Geometry, kv_load_failure_policy: str = "recompute",
                 kv_events: bool = False):
        self.config = config
        self.geo = geo
        self.T = geo.block_tokens
        self.store = TieredStore(config, geo.layout, geo.block_bytes, geo.root, name=geo.slab_name,
                                 events=kv_events)
        # kv_events: vLLM's hash, parent hash, tokens and LoRA of each block this
        # engine saved, from its save until it leaves the CPU tier.
        self._announce: dict[bytes, tuple] | None = {} if kv_events else None
        self.stats = KVPlugStats()
        self.policy = LoadPolicy(config.load_policy)
        self._step: tuple[float, int] | None = None  # (start, tokens) of the step in flight: prefill speed
        self._reqs: dict[str, _Req] = {}
        self._planned: list[_Req] = []
        self._jobs: dict[int, tuple[str, list[bytes]]] = {}  # save job -> (request, keys)
        self._next_job = 0
        self._tails: list[SaveJob] = []     # partial tails of finished requests, for the next step
        self._release: list[str] = []       # finished requests vLLM holds blocks of for us
        self._saved = Counter()             # workers done per save job / load (tensor parallel: wait for all)
        self._unsaved: set[int] = set()     # save jobs some worker could not write
        self._loaded = Counter()
        self._world = geo.tp_size  # workers that report each step (tensor parallel ranks)
        self._attached = 0
        if kv_load_failure_policy != "recompute":
            log.warning("kvplug: kv_load_failure_policy=%r fails a request when one of its blocks cannot be "
                        "loaded; 'recompute' recomputes the block instead", kv_load_failure_policy)

    # -- lookup -----------------------------------------------------------------

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        st = self._state(request)
        if st is None:
            return 0, False
        if st.handle is not None and st.load_start != num_computed_tokens:
            self._drop_handle(st)
        if st.handle is None:
            cap = request.num_tokens - 1  # the last prompt token is always computed
            if num_computed_tokens % self.T or cap - num_computed_tokens < self.config.min_hit_tokens:
                return 0, False
            hit = self.store.lookup(st.tokens(0, cap))
            if not st.looked_up:
                st.looked_up = True
                self.stats.add("lookups")
                self.stats.add("lookup_tokens", cap - num_computed_tokens)
            if hit.num_tokens - num_computed_tokens < self.config.min_hit_tokens:
                return 0, False
            refs = hit.blocks[num_computed_tokens // self.T:]
            tiers = Counter(r.tier for r in refs)
            if not self.policy.should_load(hit.num_tokens - num_computed_tokens,
                                           {t: n * self.geo.block_bytes for t, n in tiers.items()}):
                self.stats.add("policy_skipped_tokens", hit.num_tokens - num_computed_tokens)
                return 0, False
            st.handle = self.store.prepare_load(refs)
            st.load_start, st.promoting = num_computed_tokens, tiers["ssd"]
            st.asked = time.monotonic()
            if st.promoting:
                self.stats.add("promotions")
        if not st.handle.done():
            return None, False  # SSD blocks are being promoted: ask again next step, others run meanwhile
        if st.promoting:  # as seen by the request: it waited from the lookup until now
            self.policy.observe_load("ssd", st.promoting * self.geo.block_bytes, time.monotonic() - st.asked)
            st.promoting = 0
        if st.handle.failed:
            # Keep only the readable prefix pinned: a failed block must be free to be
            # stored again once this request has recomputed it.
            failed, st.handle = st.handle, self.store.prepare_load(st.handle.loadable)
            self.stats.add("promotion_failed_blocks", len(failed.failed))
            self.store.complete_load(failed)
        num = st.handle.num_tokens
        if num < self.config.min_hit_tokens:
            self._drop_handle(st)
            return 0, False
        return num, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        st = self._reqs.get(request.request_id)
        if st is None or st.handle is None:
            return
        if num_external_tokens == 0:
            self._drop_handle(st)
            return
        block_ids = blocks.get_block_ids()[0]
        start, end, T = st.load_start, st.load_start + num_external_tokens, self.T
        plan = LoadJob(request.request_id, [], [], [])
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
        st.plan, st.sources = plan, dict(sources)
        st.loaded_from, st.loaded_ids = start // T, plan.block_ids
        self._planned.append(st)
        self.stats.add("hit_tokens", num_external_tokens)
        self.stats.add("hit_tokens_cpu", sources[CacheHitSource.HOST])
        self.stats.add("hit_tokens_ssd", sources[CacheHitSource.DISK])

    def get_external_cache_hit_sources(self, request, num_external_tokens: int) -> dict[CacheHitSource, int]:
        st = self._reqs.get(request.request_id)
        return dict(st.sources) if st is not None and num_external_tokens else {}

    # -- the step ---------------------------------------------------------------

    def build_connector_meta(self, scheduler_output) -> KVPlugMetadata:
        meta = KVPlugMetadata()
        if scheduler_output.total_num_scheduled_tokens >= self.T:  # a prefill-sized step: time it
            self._step = (time.monotonic(), scheduler_output.total_num_scheduled_tokens)
        for st in self._planned:
            if st.plan is not None:
                meta.loads.append(st.plan)
                st.loading, st.handle, st.plan = st.handle, None, None
        self._planned = []

        block_state = scheduler_output.kv_connector_block_state
        for req_id, num_new in scheduler_output.num_scheduled_tokens.items():
            st = self._reqs.get(req_id)
            if st is None:
                continue
            req = st.request
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
        self._tails, self._release = [], []
        return meta

    def _save_job(self, st: _Req, blocks: list[tuple[int, StoreEntry]], block_ids: list[int]) -> SaveJob | None:
        """Reserve slots for blocks (index in the request, entry); a job for those that need writing."""
        slots = self.store.prepare_store([e for _, e in blocks])
        picked = [(block_ids[i], slot, e.key) for (i, e), slot in zip(blocks, slots) if slot is not None]
        if self._announce is not None:
            self._note_hashes(st, blocks, slots)
        self.stats.add("store_skipped_blocks", len(blocks) - len(picked))
        if not picked:
            return None
        job = SaveJob(self._next_job, st.request.request_id, [p[0] for p in picked], [p[1] for p in picked])
        self._jobs[job.job_id] = (job.req_id, [p[2] for p in picked])
        st.saves.add(job.job_id)
        self._next_job += 1
        return job

    def update_connector_output(self, output) -> None:
        if self._step is not None:
            self.policy.observe_prefill(self._step[1], time.monotonic() - self._step[0])
            self._step = None
        wm = output.kv_connector_worker_meta
        if isinstance(wm, KVPlugWorkerMetadata):
            self._on_worker_meta(wm)
        for req_id in output.finished_sending or ():
            self._reqs.pop(req_id, None)

    def _on_worker_meta(self, wm: KVPlugWorkerMetadata) -> None:
        if wm.attached:
            self._attached += wm.attached
            if self._attached >= self._world:
                # Every worker maps the slab now: drop its name so that even a kill -9 leaks nothing.
                self.store.cpu.unlink()
        for req_id, block_ids in wm.failed.items():  # before the saves: they may be poisoned
            self._on_load_failed(req_id, block_ids)
        for req_id, n in wm.loaded.items():
            self._loaded[req_id] += n
            if self._loaded[req_id] >= self._world:
                del self._loaded[req_id]
                st = self._reqs.get(req_id)
                if st is not None and st.loading is not None:
                    self.stats.add("loaded_blocks", len(st.loading.loadable))
                    self.store.complete_load(st.loading)
                    st.loading = None
        self._unsaved.update(wm.unsaved)
        for job_id, n in wm.saved.items():
            self._saved[job_id] += n
            if self._saved[job_id] < self._world:
                continue
            del self._saved[job_id]
            req_id, keys = self._jobs.pop(job_id)
            st = self._reqs.get(req_id)
            if st is not None:
                st.saves.discard(job_id)
            poisoned = st is not None and job_id in st.poisoned
            if poisoned or job_id in self._unsaved:  # bytes missing or wrong: never make them visible
                self._unsaved.discard(job_id)
                if poisoned:
                    st.poisoned.discard(job_id)
                self.store.abort_store(keys)
                self.stats.add("aborted_blocks", len(keys))
                for key in keys if self._announce is not None else ():
                    self._announce.pop(key, None)
            else:
                self.store.complete_store(keys)
                self.stats.add("stored_blocks", len(keys))

    # -- KV cache events -----------------------------------------------------------

    def _note_hashes(self, st: _Req, blocks: list[tuple[int, StoreEntry]], slots: list[int | None]) -> None:
        hashes, lora = st.request.block_hashes, st.request.lora_request
        for (i, entry), slot in zip(blocks, slots):
            if slot is not None and len(entry.tokens) == self.T and i < len(hashes):  # vLLM hashes full blocks
                self._announce[entry.key] = (hashes[i], hashes[i - 1] if i else None, entry.tokens, lora)

    def take_events(self) -> list:
        """BlockStored / BlockRemoved (medium CPU) for the full blocks this engine saved,
        as they enter and leave kvplug's CPU tier, under vLLM's own block hashes (so a
        KV-aware router sees them beside vLLM's GPU blocks). Blocks promoted from SSD
        that this engine did not save (e.g. after a restart) are not announced."""
        if self._announce is None:
            return []
        from vllm.distributed.kv_events import MEDIUM_CPU, BlockRemoved, BlockStored
        from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash as ext

        out = []
        for entered, key in self.store.take_events():
            info = self._announce.get(key) if entered else self._announce.pop(key, None)
            if info is None:
                continue
            block_hash, parent, tokens, lora = info
            if entered:
                out.append(BlockStored(block_hashes=[ext(block_hash)],
                                       parent_block_hash=None if parent is None else ext(parent),
                                       token_ids=tokens.tolist(), block_size=self.T,
                                       lora_id=lora.adapter_id if lora else None, medium=MEDIUM_CPU,
                                       lora_name=lora.name if lora else None))
            else:
                out.append(BlockRemoved(block_hashes=[ext(block_hash)], medium=MEDIUM_CPU))
        return out

    def _on_load_failed(self, req_id: str, block_ids: list[int]) -> None:
        """vLLM recomputes from the first failed block: store those blocks again, and
        never the ones this step computed on top of the bad KV."""
        self.stats.add("load_failed_blocks", len(block_ids))
        st = self._reqs.get(req_id)
        if st is None:
            return
        st.poisoned |= st.saves
        failed = [j for j, b in enumerate(st.loaded_ids) if b in set(block_ids)]
        st.next_block = min(st.next_block, st.loaded_from + min(failed, default=0))

    # -- finishing ----------------------------------------------------------------

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict | None]:
        st = self._reqs.get(request.request_id)
        if st is None:
            return False, None
        self._drop_handle(st)
        if self.config.store_partial_blocks and not st.poisoned:
            self._store_tail(st, block_ids)
        if st.saves or st.loading is not None:
            # The worker still reads (saves) or writes (loads) these blocks: vLLM
            # frees them once the worker reports the request in finished_sending.
            self._release.append(request.request_id)
            return True, None
        del self._reqs[request.request_id]
        return False, None

    def _store_tail(self, st: _Req, block_ids: list[int]) -> None:
        req = st.request
        computed = min(req.num_computed_tokens, req.num_tokens - 1)  # the last sampled token has no KV
        i, rest = divmod(computed, self.T)
        if rest == 0 or st.next_block < i or i >= len(block_ids):
            return
        job = self._save_job(st, [(i, StoreEntry.of(st.parent(i), st.tokens(i * self.T, computed)))], block_ids)
        if job is not None:
            self._tails.append(job)

    # -- helpers --------------------------------------------------------------------

    _kv_cache_manager = None

    def bind_kv_cache_manager(self, kv_cache_manager) -> None:
        self._kv_cache_manager = kv_cache_manager  # block ids of requests, when vLLM offers none

    def _state(self, request) -> _Req | None:
        st = self._reqs.get(request.request_id)
        if st is None:
            if request.prompt_embeds is not None or request.mm_features:
                return None  # the token ids do not say what the KV is
            st = _Req(request, self._root(request), self.T)
            self._reqs[request.request_id] = st
        return st

    def _root(self, request) -> bytes:
        """The key root, separated per LoRA adapter and per cache salt, as vLLM's prefix cache is."""
        lora = request.lora_request.lora_name if request.lora_request else None
        if lora is None and not request.cache_salt:
            return self.geo.root
        return xxhash.xxh3_128_digest(self.geo.root + repr((lora, request.cache_salt)).encode())

    def _drop_handle(self, st: _Req) -> None:
        if st.handle is not None:
            self.store.complete_load(st.handle)
        st.handle, st.plan = None, None

    def shutdown(self) -> None:
        for st in self._reqs.values():
            self._drop_handle(st)
        log.info("kvplug: store stats at shutdown: %s", self.store.stats())
        self.store.close()
