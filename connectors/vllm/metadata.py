"""What the two halves tell each other each step.

Scheduler -> worker (``KVPlugMetadata``, bound before the forward pass): which
slab slots to load into which of vLLM's blocks, which blocks to save into
which slots, and which finished requests to report back once saved.

Worker -> scheduler (``KVPlugWorkerMetadata``, returned with the step's
output): which save jobs and loads are done, which saves could not be written
and which loaded blocks failed.
Counts add up across workers (tensor parallel), so the scheduler acts once
every worker has reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata


@dataclass
class LoadJob:
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
    loads: list[LoadJob] = field(default_factory=list)
    saves: list[SaveJob] = field(default_factory=list)
    # Finished requests whose blocks vLLM holds for us: report them in
    # finished_sending once every save of theirs sent so far is done.
    release: list[str] = field(default_factory=list)


@dataclass
class KVPlugWorkerMetadata(KVConnectorWorkerMetadata):
    saved: dict[int, int] = field(default_factory=dict)        # job_id -> workers done
    unsaved: list[int] = field(default_factory=list)           # jobs some block of which was not written
    loaded: dict[str, int] = field(default_factory=dict)       # req_id -> workers done
    failed: dict[str, list[int]] = field(default_factory=dict)  # req_id -> vLLM block ids that failed
    attached: int = 0                                          # workers that mapped the slab this step

    def aggregate(self, other: KVConnectorWorkerMetadata) -> "KVPlugWorkerMetadata":
        assert isinstance(other, KVPlugWorkerMetadata)
        out = KVPlugWorkerMetadata(dict(self.saved), sorted(set(self.unsaved) | set(other.unsaved)), dict(self.loaded),
                                   {k: list(v) for k, v in self.failed.items()}, self.attached + other.attached)
        for job, n in other.saved.items():
            out.saved[job] = out.saved.get(job, 0) + n
        for req, n in other.loaded.items():
            out.loaded[req] = out.loaded.get(req, 0) + n
        for req, ids in other.failed.items():
            out.failed[req] = sorted(set(out.failed.get(req, [])) | set(ids))
        return out

    def is_empty(self) -> bool:
        return not (self.saved or self.unsaved or self.loaded or self.failed or self.attached)
