"""What the scheduler half keeps per request: its key chain and its load phase.

A request's load goes through explicit phases, each move checked:

    NONE ──lookup pins a hit──► PINNED ──vLLM allocates──► PLANNED ──step metadata──► LOADING
      ▲                            │                          │                          │
      └────── dropped (miss, hit changed, preempted, finished) ┘       workers report ───┘

Invariant: ``handle`` (the pinned hit) is set exactly in PINNED, PLANNED and
LOADING; ``plan`` exactly in PLANNED; ``load_job`` exactly in LOADING. Saves
are jobs of their own (jobs.py); ``saves`` holds the ids of this request's
saves in flight. A request whose state was made in another cache epoch (before
``reset_prefix_cache``) neither stores nor loads any more: its KV may predate
the reset.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from kvplug.blocks import LoadHandle, StoreEntry
from kvplug.keys import block_key, tokens_array

from .metadata import LoadJob


class LoadPhase(enum.Enum):
    NONE = "none"
    PINNED = "pinned"    # a hit is looked up and pinned (SSD blocks may still be promoting)
    PLANNED = "planned"  # vLLM allocated blocks for it: the load goes out with this step
    LOADING = "loading"  # sent to the workers, not reported done yet


_ALLOWED = {
    LoadPhase.NONE: {LoadPhase.PINNED},
    LoadPhase.PINNED: {LoadPhase.NONE, LoadPhase.PLANNED},
    LoadPhase.PLANNED: {LoadPhase.NONE, LoadPhase.LOADING},
    LoadPhase.LOADING: {LoadPhase.NONE},
}


class IllegalTransition(RuntimeError):
    pass


@dataclass(slots=True, eq=False)
class RequestState:
    request: object
    root: bytes                  # parent key of block 0: the store, its epoch, the request's identity
    epoch: bytes                 # the store's epoch when this state was made
    block_tokens: int
    keys: list[bytes] = field(default_factory=list)  # chained keys of full blocks 0..len-1
    next_block: int = 0          # first full block not yet offered to the store
    phase: LoadPhase = LoadPhase.NONE
    handle: LoadHandle | None = None
    lookup_from: int = 0         # num_computed_tokens the hit was looked up from
    asked: float = 0.0           # when it was looked up (SSD promotions are timed from here)
    promoting: int = 0           # SSD blocks of the hit being promoted
    plan: LoadJob | None = None
    load_job: int | None = None
    sources: dict = field(default_factory=dict)  # CacheHitSource -> tokens of the planned hit
    looked_up: bool = False      # counted in the lookup stats
    gave_up: bool = False        # a promotion outlived its deadline: this request recomputes
    remote: object | None = None  # a remote fetch in flight (kvplug.store_remote.RemoteFetch)
    remote_tried: bool = False   # the remote tier was asked once: never again for this request
    tainted: bool = False        # its KV may stand on a failed load, or it gained unkeyable inputs: no saves
    saves: set[int] = field(default_factory=set)
    finished: bool = False       # vLLM finished it; kept while jobs are in flight

    @property
    def req_id(self) -> str:
        return self.request.request_id

    def move(self, to: LoadPhase) -> None:
        if to not in _ALLOWED[self.phase]:
            raise IllegalTransition(f"kvplug: request {self.req_id}: load phase {self.phase.value} -> {to.value}")
        self.phase = to
        if to is LoadPhase.NONE:
            self.handle, self.plan, self.load_job, self.promoting = None, None, None, 0

    def busy(self) -> bool:
        """A load or save of this request is in flight."""
        return bool(self.saves) or self.phase is LoadPhase.LOADING

    # -- keys ------------------------------------------------------------------

    def key(self, i: int) -> bytes:
        """Key of full block i (hashing the blocks before it once)."""
        T = self.block_tokens
        for j in range(len(self.keys), i + 1):
            self.keys.append(block_key(self.parent(j), self.tokens(j * T, (j + 1) * T)))
        return self.keys[i]

    def parent(self, i: int) -> bytes:
        return self.key(i - 1) if i else self.root

    def tokens(self, start: int, end: int) -> np.ndarray:
        return tokens_array(self.request.all_token_ids[start:end])

    def entry(self, i: int) -> StoreEntry:
        """Full block i."""
        T = self.block_tokens
        return StoreEntry(self.key(i), self.parent(i), self.tokens(i * T, (i + 1) * T))
