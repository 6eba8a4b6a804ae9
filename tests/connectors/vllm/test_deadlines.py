"""A slow disk degrades to recompute: a promotion past its deadline is abandoned."""

from __future__ import annotations

import threading
import time

from kvplug.tiers.ssd import SSDTier
from test_halves import Engine

PROMPT = list(range(600, 648))  # 3 full blocks


def stored_on_ssd(tmp_path) -> str:
    ssd = str(tmp_path / "ssd")
    first = Engine(tmp_path, "one", ssd_path=ssd, ssd_bytes="16MiB")
    a = first.request("a", PROMPT)
    first.schedule(a)
    first.step({a: len(PROMPT)})
    first.close()  # flushes the SSD writes
    return ssd


def slow_reads(monkeypatch, delay_s: float) -> threading.Event:
    """Every SSD read completes ``delay_s`` late; the event is set once a late read has landed."""
    read, landed = SSDTier.read, threading.Event()

    def late(self, key, out):
        inner = read(self, key, out)
        outer = type(inner)()

        def finish():
            time.sleep(delay_s)
            outer.set_result(inner.result())
            landed.set()
        threading.Thread(target=finish, daemon=True).start()
        return outer

    monkeypatch.setattr(SSDTier, "read", late)
    return landed


def test_a_promotion_past_its_deadline_is_abandoned_and_recomputed(tmp_path, monkeypatch):
    ssd = stored_on_ssd(tmp_path)
    landed = slow_reads(monkeypatch, 1.0)
    e = Engine(tmp_path, "two", ssd_path=ssd, ssd_bytes="16MiB", promotion_timeout_s=0.2)
    try:
        b = e.request("b", PROMPT)
        assert e.sched.get_num_new_matched_tokens(b, 0) == (None, False)  # promoting: ask again
        time.sleep(0.3)
        assert e.sched.get_num_new_matched_tokens(b, 0) == (0, False)  # past the deadline: recompute
        assert e.sched.stats.data["promotion_timeouts"] == 1
        assert e.sched.get_num_new_matched_tokens(b, 0) == (0, False)  # and it does not wait again
        e.step({b: len(PROMPT)})  # recomputed
        assert landed.wait(5)
        time.sleep(0.1)
        assert e.sched.store.stats()["cpu"]["pinned_blocks"] == 0  # the late read left no pin
        c = e.request("c", PROMPT)
        assert e.schedule(c) == len(PROMPT) - 1  # the late read still landed in the CPU tier
    finally:
        e.close()


def test_the_deadline_is_sooner_when_recomputing_is_faster(tmp_path, monkeypatch):
    ssd = stored_on_ssd(tmp_path)
    slow_reads(monkeypatch, 1.0)
    e = Engine(tmp_path, "two", ssd_path=ssd, ssd_bytes="16MiB", promotion_timeout_s=60, promotion_min_wait_s=0)
    try:
        e.sched.policy.observe_prefill(4700, 1.0)  # 47 tokens recompute in 10 ms
        b = e.request("b", PROMPT)
        assert e.sched.get_num_new_matched_tokens(b, 0) == (None, False)
        time.sleep(0.05)
        assert e.sched.get_num_new_matched_tokens(b, 0) == (0, False)
    finally:
        e.close()


def test_after_a_timeout_the_next_ssd_hit_recomputes_at_once(tmp_path, monkeypatch):
    ssd = stored_on_ssd(tmp_path)
    landed = slow_reads(monkeypatch, 1.0)
    e = Engine(tmp_path, "two", ssd_path=ssd, ssd_bytes="16MiB", promotion_timeout_s=0.2,
               promotion_min_wait_s=0)  # load_policy=always
    try:
        e.sched.policy.observe_prefill(4700, 1.0)  # recomputing 47 tokens: 10 ms
        b = e.request("b", PROMPT)
        assert e.sched.get_num_new_matched_tokens(b, 0) == (None, False)
        time.sleep(0.05)
        assert e.sched.get_num_new_matched_tokens(b, 0) == (0, False)  # timed out
        c = e.request("c", PROMPT)
        assert e.sched.get_num_new_matched_tokens(c, 0) == (0, False)  # no wait: the SSD is known slow
        assert e.sched.stats.data["policy_skipped_tokens"] == len(PROMPT) - 1
        assert landed.wait(5)
    finally:
        e.close()


def test_a_disk_judged_slow_is_probed_in_the_background_and_seen_to_recover(tmp_path, monkeypatch):
    import kvplug.policy

    ssd = stored_on_ssd(tmp_path)
    e = Engine(tmp_path, "two", ssd_path=ssd, ssd_bytes="16MiB")
    try:
        e.sched.policy.observe_prefill(4700, 1.0)
        e.sched.policy.observe_timeout("ssd", 10**6, 10.0)  # judged slow: 100 kB/s
        monkeypatch.setattr(kvplug.policy, "PROBE_S", 0.0)
        b = e.request("b", PROMPT)
        assert e.sched.get_num_new_matched_tokens(b, 0) == (0, False)  # recomputes at once, no wait...
        deadline = time.monotonic() + 10
        while e.sched.policy.load_seconds({"ssd": 10**6}) >= 10 and time.monotonic() < deadline:
            time.sleep(0.02)  # ...while one block is read in the background
        assert e.sched.policy.load_seconds({"ssd": 10**6}) < 9.9  # the probe's real speed averaged in
        assert e.sched.store.stats()["cpu"]["pinned_blocks"] == 0
    finally:
        e.close()


def test_no_block_landed_within_a_twentieth_of_recomputing_gives_up_and_blocks_no_one(tmp_path, monkeypatch):
    ssd = stored_on_ssd(tmp_path)
    landed = slow_reads(monkeypatch, 1.0)
    e = Engine(tmp_path, "two", ssd_path=ssd, ssd_bytes="16MiB", promotion_timeout_s=60, promotion_min_wait_s=0)
    try:
        e.sched.policy.observe_prefill(47, 1.0)  # recomputing the hit: 1 s (the deadline: 1 s)
        b = e.request("b", PROMPT)
        assert e.sched.get_num_new_matched_tokens(b, 0) == (None, False)
        time.sleep(0.08)  # past a twentieth of recomputing (50 ms), no block landed
        assert e.sched.get_num_new_matched_tokens(b, 0) == (0, False)
        assert e.sched.stats.data["promotion_timeouts"] == 1
        # The policy is told the disk is fast again, but b's reads are still in flight:
        # the next SSD hit recomputes at once instead of queueing behind them.
        e.sched.policy.observe_first("ssd", 0.001)
        e.sched.policy.observe_load("ssd", 10**9, 0.001)
        c = e.request("c", PROMPT)
        assert e.sched.get_num_new_matched_tokens(c, 0) == (0, False)
        assert e.sched.stats.data["promotions"] == 1
        assert landed.wait(5)
        time.sleep(0.1)
        d = e.request("d", PROMPT)  # the late read landed (in the CPU tier): a CPU hit
        assert e.sched.get_num_new_matched_tokens(d, 0) == (len(PROMPT) - 1, False)
        e.sched.promotions.observe_late()  # what every step does
        assert e.sched.policy.first_seconds("ssd") > 0.9  # its real first-block time, followed at once
        assert not e.sched.promotions.suspect()
    finally:
        e.close()


def test_a_disk_judged_slow_still_lets_the_cpu_blocks_before_it_load(tmp_path, monkeypatch):
    ssd = stored_on_ssd(tmp_path)
    landed = slow_reads(monkeypatch, 0.3)
    e = Engine(tmp_path, "two", ssd_path=ssd, ssd_bytes="16MiB", promotion_timeout_s=0.05,
               promotion_min_wait_s=0)
    try:
        e.sched.policy.observe_prefill(4700, 1.0)  # recomputing 47 tokens: 10 ms
        b = e.request("b", PROMPT)
        assert e.sched.get_num_new_matched_tokens(b, 0) == (None, False)
        time.sleep(0.1)
        assert e.sched.get_num_new_matched_tokens(b, 0) == (0, False)  # timed out: the SSD is slow
        assert landed.wait(5)
        time.sleep(0.1)  # the late reads landed in the CPU tier: take the last two out again
        store, root = e.sched.store, e.sched._reqs["b"].root
        keys = [r.key for r in store.lookup(PROMPT[:-1], root).blocks]
        with store._lock:
            assert all(store._evict(k, []) for k in keys[1:])
        e.sched.promotions.observe_late()
        assert [r.tier for r in store.lookup(PROMPT[:-1], root).blocks] == ["cpu", "ssd", "ssd"]
        e.sched.policy.observe_load("ssd", 1 << 20, 10.0)  # and the SSD known very slow
        skipped = e.sched.stats.data.get("policy_skipped_tokens", 0)
        c = e.request("c", PROMPT)
        assert e.sched.get_num_new_matched_tokens(c, 0) == (16, False)  # block 0, from the CPU tier, loads
        assert e.sched.stats.data["policy_skipped_tokens"] - skipped == len(PROMPT) - 1 - 16
    finally:
        e.close()
