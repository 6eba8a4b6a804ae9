"""The halves state machine's invariants: every computed position holds its KV, every stored
block holds what its key was chained from, nothing is held when idle, drain releases all."""

from __future__ import annotations

import time

import torch
from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule

from kvplug.block_state import BlockState
from kvplug.keys import block_key, tokens_array
from halves_world import LAYERS, _salt, _seeds, _values
from test_halves import D, H, T


class Invariants:
    # -- invariants ---------------------------------------------------------------------------

    def _check_computed(self) -> None:
        """Every computed position of a running request holds its KV, but blocks vLLM recomputes."""
        for mr in self.running:
            if mr.stale:
                continue
            for layer in range(LAYERS):
                wrong = [p for p in self._wrong_positions(mr, 0, mr.ncomp, layer)
                         if mr.blocks[p // T] not in self.known_bad]
                assert not wrong, (f"{mr}: computed positions {wrong[:8]} (blocks "
                                   f"{sorted({mr.blocks[p // T] for p in wrong})}) hold wrong KV at layer {layer}")

    def _register(self) -> None:
        """What each key the scheduler half can store means: chained from each request state's root,
        for every prefix of its tokens (full blocks and partial tails)."""
        for st_ in list(self.sched._reqs.values()):
            if st_ is None:
                continue
            mr = self.by_obj.get(id(st_.request))
            assert mr is not None and not mr.embeds, f"a request state for {mr}"
            gen = self.epoch_gen.get(st_.epoch)
            assert gen is not None, "a request state under an epoch no reset made"
            held = self.reg_upto.get(id(st_))
            _, nfull, parent, tail = held if held is not None and held[0] is st_ else (st_, 0, st_.root, 0)
            tokens = st_.request.all_token_ids
            n = len(tokens)
            while True:
                base = nfull * T
                upto = min(T, n - base)
                for m in range(tail + 1, upto + 1):
                    key = block_key(parent, tokens_array(tokens[base:base + m]))
                    meaning = (mr.ident, gen, tuple(tokens[:base + m]))
                    old = self.registry.setdefault(key, meaning)
                    assert old == meaning, f"one key for two meanings: {old[:2]} and {meaning[:2]}"
                if upto < T:
                    tail = max(tail, upto)
                    break
                parent, nfull, tail = block_key(parent, tokens_array(tokens[base:base + T])), nfull + 1, 0
            self.reg_upto[id(st_)] = (st_, nfull, parent, tail)

    def _expect(self, key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        got = self.slot_expect.get(key)
        if got is not None:
            return got
        ident, gen, toks = self.registry[key]
        i = (len(toks) - 1) // T
        m = len(toks) - i * T
        seeds, _ = _seeds(ident, gen, toks)
        seeds = seeds[i * T:]
        parts, masks = [], []
        for rank in range(self.tp):
            for layer in range(LAYERS):
                full = torch.zeros(2, T, H, D, dtype=torch.bfloat16)
                full[:, :m] = _values(seeds, _salt(layer, rank)).permute(1, 0, 2, 3)
                mask = torch.zeros(2, T, H, D, 2, dtype=torch.bool)
                mask[:, :m] = True
                parts.append(full.contiguous().view(torch.uint8).flatten())
                masks.append(mask.flatten())
        got = self.slot_expect[key] = (torch.cat(parts), torch.cat(masks))
        return got

    def _check_store(self, written: set[int]) -> None:
        """Every block visible in the store holds the KV of its key's tokens and identity (checked
        when it becomes visible, and again whenever a save of the step wrote its slot)."""
        buf, bb = self.store.cpu.buffer, self.e.geo.block_bytes
        for key, res in list(self.store._resident.items()):
            if not res.visible or (self.verified.get(key) == res.slot and res.slot not in written):
                continue
            meaning = self.registry.get(key)
            assert meaning is not None, "a visible block that no request's key chain explains"
            exp, mask = self._expect(key)
            got = buf[res.slot, :bb]
            if not torch.equal(got[mask], exp[mask]):
                ident, gen, toks = meaning
                raise AssertionError(f"the stored block of {len(toks)} tokens under identity {ident}, generation "
                                     f"{gen} (slot {res.slot}) does not hold their KV")
            self.verified[key] = res.slot

    @invariant()
    def keys_mean_one_thing(self):
        if self.e is not None:
            self._register()

    @invariant()
    def nothing_held_when_idle(self):
        """Every request released and no job in flight (a load may be reported done after its
        request was released: its writes are over, its slots are unpinned when it is)."""
        if self.e is None or self.built is not None or self.batch or len(self.sched._jobs):
            return
        if any(m.status != "gone" for m in self.current.values()):
            return
        self._assert_idle()

    def _assert_idle(self) -> None:
        assert len(self.sched._jobs) == 0, f"jobs left: {[(j.job_id, j.state.req_id) for j in self.sched._jobs]}"
        pinned = self.store.stats()["cpu"]["pinned_blocks"]
        assert pinned == 0, f"{pinned} blocks pinned with no request left"
        storing = sum(b.state is BlockState.STORING for b in self.store._resident.values())
        assert not storing, f"{storing} slots reserved for saves never completed or aborted"
        leaked = self.store.cpu.num_slots - self.store.cpu.num_free - len(self.store._resident)
        assert not leaked, f"{leaked} CPU slots allocated to no block"
        assert not self.sched._reqs, f"request states left: {list(self.sched._reqs)}"

    @rule(now=st.integers(0, 2))
    def drain(self, now=0):
        """Every request finished; steps without tokens until kvplug gave every block back."""
        if now or self.built is not None or all(m.status == "gone" for m in self.current.values()):
            return  # (a third as likely as the other rules)
        for e in list(self.batch):
            self.batch.remove(e)
        for mr in self._live():
            self._finish(mr)
        for i in range(200):  # (transfers finish on the pipeline threads: a few steps, a few ms)
            if i and not any(m.status == "held" for m in self.current.values()) and not len(self.sched._jobs):
                break
            if i > 4:
                time.sleep(0.005)
            self._progress(None, "")
            self.build(block_state=False)
            self.execute(_NoDraws())
        held = [m for m in self.current.values() if m.status == "held"]
        assert not held, f"finished requests never released: {held}"
        self._assert_idle()
        assert not self.sched._planned and not self.sched._tails and not self.sched._release
        for rank in range(self.tp):
            missing = set(self.jobs) - self.reported[rank]
            assert not missing, f"rank {rank} never reported jobs {sorted(missing)}"


class _NoDraws:
    """st.data() for the steps drain runs (vLLM's kv_connector_no_forward: no tokens, nothing to choose)."""

    def draw(self, strategy, label=None):
        if (label or "").startswith("saves written"):
            return True  # drain lets deferred saves be written
        raise AssertionError("a step without tokens draws no other choice")
