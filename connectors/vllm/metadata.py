"""What the two halves tell each other each step.

Scheduler -> worker (``KVPlugMetadata``, bound before the forward pass): which
slab slots to load into which of vLLM's blocks, which blocks to save into
which slots, and which finished requests to report back once saved.

Worker -> scheduler (``KVPlugWorkerMetadata``, returned with the step's
output, or a later one's: the worker reports what has finished whenever vLLM
asks): which jobs (loads and saves) are done, which saves could not be written
and which blocks of which loads failed. A load's failures are always reported
no later than its completion, and before any save computed over it.
Counts add up across workers (tensor parallel), so the scheduler acts once
every worker has reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata


@dataclass
class LoadJob:
    job_id: int
    req_id: str
    block_ids: list[int]   # vLLM blocks to fill, in prefix order
    slots: list[int]       # slab slot of each
    num_tokens: list[int]  # leading tokens of each block to write (the last may be partial)


@dataclass
class SaveJob:
    job_id: int
    req_id: str
    block_ids: list[int]   # vLLM blocks to read
    slots: list[int]       # slab slot to encode each into


@dataclass
class KVPlugMetadata(KVConnectorMetadata):
    slab: tuple[str, bytes] = ("", b"")  # the CPU tier's shared-memory file: (name, instance nonce)
    loads: list[LoadJob] = field(default_factory=list)
    saves: list[SaveJob] = field(default_factory=list)
    # Finished requests whose blocks vLLM holds for us: report them in
    # finished_sending once every save of theirs sent so far is done.
    release: list[str] = field(default_factory=list)
    # Requests vLLM preempted this step with saves in flight: their blocks may be
    # reused once this step runs, so those saves must finish first.
    preempted: list[str] = field(default_factory=list)


@dataclass
class KVPlugWorkerMetadata(KVConnectorWorkerMetadata):
    done: dict[int, int] = field(default_factory=dict)         # job_id (load or save) -> workers done
    unsaved: list[int] = field(default_factory=list)           # save jobs some block of which was not written
    failed: dict[int, list[int]] = field(default_factory=dict)  # load job_id -> vLLM block ids that failed
    attached: int = 0                                          # workers that mapped the slab

    def aggregate(self, other: KVConnectorWorkerMetadata) -> "KVPlugWorkerMetadata":
        assert isinstance(other, KVPlugWorkerMetadata)
        out = KVPlugWorkerMetadata(dict(self.done), sorted(set(self.unsaved) | set(other.unsaved)),
                                   {k: list(v) for k, v in self.failed.items()}, self.attached + other.attached)
        for job, n in other.done.items():
            out.done[job] = out.done.get(job, 0) + n
        for job, ids in other.failed.items():
            out.failed[job] = sorted(set(out.failed.get(job, [])) | set(ids))
        return out

    def is_empty(self) -> bool:
        return not (self.done or self.unsaved or self.failed or self.attached)
