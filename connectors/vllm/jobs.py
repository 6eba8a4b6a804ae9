"""Transfer jobs in flight between the scheduler half and the workers.

One record per job, loads and saves alike, and one completion rule: a job is
done when every tensor-parallel worker has reported it. A save remembers the
vLLM blocks its KV was computed over (the request's blocks up to the last one
it saves), so that a block whose load failed poisons every save computed over
it, whichever request owns the save (another request may share the block
through vLLM's prefix cache in the same step). A poisoned, unwritten or
pre-reset save is aborted: its bytes never become visible.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvplug.blocks import LoadHandle

from .request_state import RequestState


@dataclass(slots=True, eq=False)
class Job:
    job_id: int
    state: RequestState
    pending: int                          # workers that have not reported it yet
    handle: LoadHandle | None = None      # loads: the pinned hit
    block_ids: list[int] = field(default_factory=list)  # loads: the vLLM blocks it fills, in order
    keys: list[bytes] = field(default_factory=list)  # saves: the blocks' keys
    over: frozenset[int] = frozenset()    # saves: vLLM blocks the saved KV was computed over
    first_block: int = 0                  # request block index of the first block loaded / saved
    epoch: bytes = b""                    # saves: the store's epoch when the save was planned
    poisoned: bool = False                # computed over a block that failed to load
    unsaved: bool = False                 # some worker could not write it

    @property
    def is_load(self) -> bool:
        return self.handle is not None


class JobTable:
    def __init__(self, workers: int):
        self.workers = workers
        self._jobs: dict[int, Job] = {}
        self._next = 0

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self):
        return iter(self._jobs.values())

    def add(self, state: RequestState, **fields) -> Job:
        job = Job(self._next, state, self.workers, **fields)
        self._jobs[job.job_id] = job
        self._next += 1
        return job

    def get(self, job_id: int) -> Job | None:
        return self._jobs.get(job_id)

    def poison(self, failed_blocks: set[int]) -> list[Job]:
        """Mark every save in flight computed over one of ``failed_blocks``; those newly marked."""
        hit = [j for j in self._jobs.values() if not j.is_load and not j.poisoned and j.over & failed_blocks]
        for job in hit:
            job.poisoned = True
        return hit

    def report(self, job_id: int, workers: int) -> Job | None:
        """Count ``workers`` more reports of a job; the job once every worker has reported it."""
        job = self._jobs.get(job_id)
        if job is None:
            return None
        job.pending -= workers
        if job.pending > 0:
            return None
        del self._jobs[job_id]
        return job
