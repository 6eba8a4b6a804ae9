import pytest

from kvplug.policy import LoadPolicy


def test_always_loads_any_hit():
    p = LoadPolicy("always")
    assert p.should_load(1, {"ssd": 10**12})
    assert not p.should_load(0, {})


def test_auto_loads_until_measured():
    p = LoadPolicy("auto")
    assert p.should_load(100, {"ssd": 10**9})  # nothing measured yet
    p.observe_prefill(1000, 1.0)
    assert p.should_load(100, {"ssd": 10**9})  # SSD still unmeasured


def test_auto_compares_measured_load_and_recompute():
    p = LoadPolicy("auto")
    p.observe_prefill(1000, 1.0)  # 1000 tokens/s
    p.observe_load("cpu", 10**9, 0.1)  # 10 GB/s
    p.observe_load("ssd", 10**9, 1.0)  # 1 GB/s
    # 500 tokens: 0.5 s to recompute
    assert p.should_load(500, {"cpu": 10**9})  # 0.1 s from CPU
    assert not p.should_load(500, {"ssd": 10**9})  # 1.0 s from SSD
    assert p.should_load(500, {"ssd": 2 * 10**8})  # 0.2 s
    assert p.snapshot()["prefill_tokens_per_s"] == pytest.approx(1000)


def test_estimates_follow_the_machine():
    p = LoadPolicy("auto")
    p.observe_load("ssd", 10**9, 1.0)
    for _ in range(50):
        p.observe_load("ssd", 10**9, 0.1)
    assert p.load_seconds({"ssd": 10**9}) == pytest.approx(0.1, rel=0.05)


def test_bad_mode():
    with pytest.raises(ValueError, match="'always' or 'auto'"):
        LoadPolicy("sometimes")


def test_a_slow_tier_is_skipped_in_every_mode_and_probed_once_a_while(monkeypatch):
    import kvplug.policy

    p = LoadPolicy("always")
    p.observe_prefill(1000, 1.0)                    # 500 tokens recompute in 0.5 s
    assert p.should_load(500, {"cpu": 10**9})       # "always": CPU hits are loaded regardless
    p.observe_timeout("ssd", 10**6, 2.0)            # a promotion of 1 MB took over 2 s
    assert not p.should_load(500, {"ssd": 10**6})   # the next one would too: recompute
    assert p.should_load(500, {"cpu": 10**9})
    assert not p.probe_due("ssd")                   # just measured
    monkeypatch.setattr(kvplug.policy, "PROBE_S", 0.0)
    assert not p.should_load(500, {"ssd": 10**6})   # no request waits for a probe...
    assert p.probe_due("ssd")                       # ...one block is read in the background
    monkeypatch.setattr(kvplug.policy, "PROBE_S", 60.0)
    assert not p.probe_due("ssd")                   # and only one
    p.observe_load("ssd", 10**8, 0.01)              # the disk recovered: the estimate follows
    for _ in range(10):
        p.observe_load("ssd", 10**8, 0.01)
    assert p.should_load(500, {"ssd": 10**6})


def test_promotion_deadline_keeps_a_give_up_within_a_tenth_of_recomputing():
    p = LoadPolicy("always")
    ssd = {"ssd": 100_000_000}
    assert p.promotion_deadline(1000, ssd, cap_s=5) == 5  # nothing measured: the cap
    p.observe_prefill(1000, 1.0)  # recomputing 1000 tokens: 1 s
    assert p.promotion_deadline(1000, ssd, cap_s=5) == pytest.approx(1.0)  # first promotion: until recomputing wins
    assert p.promotion_deadline(1000, ssd, cap_s=0.5) == 0.5
    p.observe_load("ssd", 1_000_000_000, 1.0)  # 1 GB/s: 100 MB in 0.1 s
    assert p.promotion_deadline(1000, ssd, cap_s=5) == pytest.approx(0.2)  # twice the prediction
    assert p.promotion_deadline(1000, {"ssd": 10_000_000}, cap_s=5) == pytest.approx(0.1)  # at least a tenth
    assert p.promotion_deadline(1000, {"ssd": 10_000_000}, cap_s=5, floor_s=0.05) == pytest.approx(0.1)
    # the floor (scheduling jitter) never takes a give-up past a tenth of recomputing
    assert p.promotion_deadline(1000, {"ssd": 1_000}, cap_s=5, floor_s=0.3) == pytest.approx(0.1)
    assert p.promotion_deadline(1000, {"ssd": 450_000_000}, cap_s=5) == pytest.approx(0.9)
    assert p.promotion_deadline(1000, {"ssd": 600_000_000}, cap_s=5) == pytest.approx(1.0)  # never past recomputing
    assert p.promotion_deadline(1000, {"ssd": 1_200_000_000}, cap_s=5) == pytest.approx(1.0)


def test_no_block_landed_within_a_twentieth_of_recomputing_gives_up():
    p = LoadPolicy("always")
    assert p.first_landing_budget(1000, cap_s=5) == 5  # recompute unmeasured: the cap
    p.observe_prefill(1000, 1.0)  # 1 s to recompute
    assert p.first_landing_budget(1000, cap_s=5) == pytest.approx(0.05)
    assert p.first_landing_budget(1000, cap_s=5, floor_s=0.08) == pytest.approx(0.08)  # jitter floor
    assert p.first_landing_budget(1000, cap_s=5, floor_s=0.5) == pytest.approx(0.1)   # at most a tenth
    assert p.first_landing_budget(1000, cap_s=0.01) == pytest.approx(0.01)


def test_a_tier_whose_first_block_comes_too_late_is_not_waited_on():
    p = LoadPolicy("always")
    p.observe_prefill(1000, 1.0)
    p.observe_load("ssd", 10**6, 0.01)
    p.observe_first("ssd", 0.004)
    assert p.should_load(1000, {"ssd": 10**6})
    p.observe_timeout("ssd", 10**6, 0.05, landed_any=False)  # nothing landed in 50 ms
    assert p.first_seconds("ssd") == pytest.approx(0.05)
    assert not p.should_load(1000, {"ssd": 10**6})  # it would be given up on again: recompute at once
    assert p.should_load(4000, {"ssd": 10**6})      # a longer prompt still waits (4 s at stake)
    assert p.should_load(1000, {"ssd": 10**6}, floor_s=0.08)  # the same floor as the give-up's


def test_a_disk_that_changes_is_followed_at_once_not_averaged_in():
    p = LoadPolicy("always")
    p.observe_load("ssd", 10**8, 0.01)             # 10 GB/s
    p.observe_load("ssd", 10**8, 0.012)            # noise: averaged
    assert p.load_seconds({"ssd": 10**8}) == pytest.approx(0.0104, rel=0.02)
    p.observe_load("ssd", 10**8, 1.0)              # 100x slower: replaces the estimate
    assert p.load_seconds({"ssd": 10**8}) == pytest.approx(1.0)
    p.observe_first("ssd", 0.3)
    p.observe_first("ssd", 0.003)                  # and back
    assert p.first_seconds("ssd") == pytest.approx(0.003)
    p.observe_prefill(1000, 1.0)
    p.observe_prefill(1000, 0.1)                   # prefill speed is averaged as before
    assert p.recompute_seconds(1000) == pytest.approx(1000 / (0.8 * 1000 + 0.2 * 10000))
