"""What each mode asks of the engines: the soak's prompts, batches and faults in turn; the
slow-disk bench's steps and phases. Pure functions of a seed (no vLLM needed)."""

from __future__ import annotations


# -- soak -----------------------------------------------------------------------------


PREFIX_LENGTHS = (128, 200, 256, 320, 384, 448)  # some not block-aligned: token-granular hits


def soak_workload(n: int, seed: int, prefixes: int, suffixes: int, unique: float, fresh: float = 0.0,
                  vocab: int = 2000) -> tuple[list[dict], dict[str, list[int]]]:
    """n requests ({"i", "key", "kind": "pool" | "unique" | "fresh"}) and every distinct prompt by key.

    Prefixes are drawn with a skew (a few hot ones); a pool prompt is prefix p plus its
    suffix s (suffixes of one prefix differ in their first token), a unique one is
    prefix p plus a fresh suffix, a fresh one shares nothing (a miss)."""
    import numpy as np

    rng = np.random.RandomState(seed)
    pre = [rng.randint(4, vocab, size=int(rng.choice(PREFIX_LENGTHS))).tolist() for _ in range(prefixes)]
    prompts: dict[str, list[int]] = {}
    for p in range(prefixes):
        for s in range(suffixes):
            suffix = rng.randint(4, vocab, size=int(rng.randint(8, 121))).tolist()
            suffix[0] = 4 + s
            prompts[f"p{p}s{s}"] = pre[p] + suffix
    weights = 1.0 / np.arange(1, prefixes + 1) ** 0.6
    weights /= weights.sum()
    reqs = []
    for i in range(n):
        p = int(rng.choice(prefixes, p=weights))
        x = rng.rand()
        if x < fresh:
            key = f"f{i}"
            prompts[key] = rng.randint(4, vocab, size=int(rng.randint(128, 449))).tolist()
            reqs.append({"i": i, "key": key, "kind": "fresh"})
        elif x < fresh + unique:
            key = f"u{i}"
            prompts[key] = pre[p] + rng.randint(4, vocab, size=int(rng.randint(8, 201))).tolist()
            reqs.append({"i": i, "key": key, "kind": "unique"})
        else:
            reqs.append({"i": i, "key": f"p{p}s{int(rng.randint(suffixes))}", "kind": "pool"})
    return reqs, prompts


def batch_bounds(n: int, seed: int, max_batch: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) slices of 1..max_batch requests (one generate() call each)."""
    import numpy as np

    rng = np.random.RandomState(seed + 1)
    out, i = [], 0
    while i < n:
        k = int(rng.randint(1, max_batch + 1))
        out.append((i, min(n, i + k)))
        i += k
    return out


FAULTS = [
    ("read_error", {"count": 3}),                 # the next 3 SSD reads raise EIO
    ("enospc", {"count": 16}),                    # the next 16 writes raise ENOSPC
    ("bitflip", {"count": 2}),                    # the next 2 reads return a flipped byte
    # Last in each round, and one read: after a promotion times out kvplug recomputes SSD
    # hits without waiting until its probe (kvplug.policy.PROBE_S) finds the disk fast again.
    ("slow_read", {"count": 1, "seconds": 0.5}),  # the next read takes 0.5 s more
]
# what kvplug should have counted for each kind (snapshot / counter fields of a sample)
FAULT_EVIDENCE = {"read_error": "ssd_io_faults", "slow_read": "promotion_timeouts",
                  "enospc": "ssd_io_faults", "bitflip": "ssd_corruptions"}


# -- slow and failing disk ---------------------------------------------------------------


PHASES = [
    ("normal", None),
    ("slow10", {"fault": "slow", "factor": 10, "writes": False}),      # every SSD read takes 10x as long
    ("slow100", {"fault": "slow", "factor": 100, "writes": False}),    # ... 100x
    ("fail_every3", {"fault": "fail_every", "n": 3}),                   # every 3rd SSD read raises EIO
]


def slow_disk_workload(trials: int, seed: int, phases: list[str], prefix_tokens: int = 1024,
                       suffix_tokens: int = 32, miss_tokens: int = 384, vocab: int = 2000) -> tuple[list[dict], dict[str, list[int]]]:
    """Steps (one generate() call each) per phase and trial, and every prompt by key.

    A = P + a stores the prefix P; F1, F2 (fresh, longer than the CPU tier) push P out of
    the CPU tier; B = P + b hits P from SSD; MIX = [P of the previous trial + c, three
    misses] (an SSD hit beside misses); MISS = four misses (miss throughput)."""
    import numpy as np

    rng = np.random.RandomState(seed)
    prompts: dict[str, list[int]] = {}
    steps: list[dict] = []

    def fresh(n):
        return rng.randint(4, vocab, size=n).tolist()

    for phase in phases:
        prev = None
        for t in range(trials):
            tag = f"{phase}.{t}"
            p = fresh(prefix_tokens)
            for j, name in enumerate("abc"):
                suffix = fresh(suffix_tokens)
                suffix[0] = 4 + j
                prompts[f"{tag}.{name.upper()}"] = p + suffix
            for k in (1, 2):
                prompts[f"{tag}.F{k}"] = fresh(prefix_tokens + suffix_tokens)
            for k in range(7):
                prompts[f"{tag}.U{k}"] = fresh(miss_tokens)
            steps += [{"phase": phase, "trial": t, "step": "A", "keys": [f"{tag}.A"]},
                      {"phase": phase, "trial": t, "step": "F", "keys": [f"{tag}.F1", f"{tag}.F2"]},
                      {"phase": phase, "trial": t, "step": "B", "keys": [f"{tag}.B"]}]
            if prev is not None:
                steps.append({"phase": phase, "trial": t, "step": "MIX",
                              "keys": [f"{prev}.C"] + [f"{tag}.U{k}" for k in range(3)]})
            steps.append({"phase": phase, "trial": t, "step": "MISS", "keys": [f"{tag}.U{k}" for k in range(3, 7)]})
            prev = tag
    return steps, prompts
