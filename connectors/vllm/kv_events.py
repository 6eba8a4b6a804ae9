"""KV cache events for the blocks kvplug saves.

With vLLM's ``--kv-events-config`` on, every full block this engine saves is
announced as ``BlockStored`` (medium CPU) under vLLM's own block hash when it
becomes readable in kvplug's CPU tier, and ``BlockRemoved`` when it leaves it,
so a KV-aware router sees kvplug's blocks beside vLLM's. Blocks promoted from
SSD that this engine did not save (e.g. after a restart) are not announced:
their vLLM hashes are unknown here.
"""

from __future__ import annotations


class KVEventLog:
    def __init__(self, block_tokens: int):
        self.T = block_tokens
        # vLLM's hash, parent hash, tokens and LoRA of each block this engine
        # saved, from its save until it leaves the CPU tier.
        self._blocks: dict[bytes, tuple] = {}

    def note(self, request, blocks, slots) -> None:
        """Remember vLLM's hashes of the full blocks (index, entry) a save reserved a slot for."""
        hashes, lora = request.block_hashes, request.lora_request
        for (i, entry), slot in zip(blocks, slots):
            if slot is not None and len(entry.tokens) == self.T and i < len(hashes):  # vLLM hashes full blocks
                self._blocks[entry.key] = (hashes[i], hashes[i - 1] if i else None, entry.tokens, lora)

    def forget(self, keys) -> None:
        for key in keys:
            self._blocks.pop(key, None)

    def events(self, store_events) -> list:
        """vLLM events for the store's (entered?, key) events."""
        from vllm.distributed.kv_events import MEDIUM_CPU, BlockRemoved, BlockStored
        from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash as ext

        out = []
        for entered, key in store_events:
            info = self._blocks.get(key) if entered else self._blocks.pop(key, None)
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
