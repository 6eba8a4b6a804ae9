"""A CPU-resident block's lifecycle in the store, with checked transitions.

    prepare_store ─► STORING ──complete_store──► VISIBLE ──evict / reset──► EVICTING ─► (slot freed)
                        └──abort_store──► (slot freed)   ▲
    prepare_load (SSD) ─► PROMOTING ──read ok────────────┘
                             └──read failed──► FAILED ─► (slot freed)

VISIBLE and EVICTING blocks hold valid bytes and may be loaded; only VISIBLE
ones are in the eviction policy. An EVICTING block (out of the CPU tier, e.g.
waiting for its SSD write-back) and a FAILED one give their slot back at their
last unpin: pins are loads in flight plus an SSD transfer of the slot. An
illegal step raises ``IllegalTransition``: a bug caught where it happens, not
a wrong byte later.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kvplug.blocks import BlockRef, StoreEntry


class BlockState(enum.Enum):
    STORING = "storing"      # slot reserved, the caller is writing its bytes
    PROMOTING = "promoting"  # slot reserved, an SSD read is filling it
    VISIBLE = "visible"      # bytes valid, in the CPU tier: the policy may evict it
    EVICTING = "evicting"    # bytes valid, out of the CPU tier: the slot goes at the last unpin
    FAILED = "failed"        # a promotion that could not be read: the slot goes at the last unpin


_ALLOWED = {
    BlockState.STORING: {BlockState.VISIBLE},
    BlockState.PROMOTING: {BlockState.VISIBLE, BlockState.FAILED},
    BlockState.VISIBLE: {BlockState.EVICTING},
    BlockState.EVICTING: set(),
    BlockState.FAILED: set(),
}
_READABLE = (BlockState.VISIBLE, BlockState.EVICTING)
_LEAVING = (BlockState.EVICTING, BlockState.FAILED)


class IllegalTransition(RuntimeError):
    pass


@dataclass(slots=True)
class Resident:
    """A block that holds a CPU slot."""
    slot: int
    state: BlockState
    pins: int = 0
    ref: BlockRef | None = None  # its full-block CPU ref, made once: lookups hand out thousands a second
    entry: StoreEntry | None = None  # STORING: its parent and tokens, indexed at complete_store
    waiting: list | None = None  # PROMOTING: the (handle, index) of every load waiting for the read
    writing: bool = False        # an SSD write of its slot is queued or in flight (it holds a pin)

    @property
    def visible(self) -> bool:
        """Its bytes are valid: a load may read them."""
        return self.state in _READABLE

    def move(self, to: BlockState) -> None:
        if to not in _ALLOWED[self.state]:
            raise IllegalTransition(f"kvplug store: a block cannot go from {self.state.value} to {to.value}")
        self.state = to

    def pin(self) -> None:
        if self.state is BlockState.FAILED:
            raise IllegalTransition("kvplug store: a block whose promotion failed cannot be pinned")
        self.pins += 1

    def unpin(self) -> bool:
        """True when this was the last pin of an evicted block: its slot may go back."""
        if self.pins <= 0:
            raise IllegalTransition("kvplug store: unpin of a block that is not pinned")
        self.pins -= 1
        return self.pins == 0 and self.state in _LEAVING

    def releasable(self) -> bool:
        """Whether the slot may go back now (a storing block's only through abort_store)."""
        return self.pins == 0 and self.state in (*_LEAVING, BlockState.STORING)
