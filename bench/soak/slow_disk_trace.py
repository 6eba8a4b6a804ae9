"""Per-request timelines of the slow-disk bench, from trace.py's lines and vLLM's own timestamps.

For a request: when it was queued, when kvplug looked it up and started its
promotion (and the deadline the policy set), each time it was given up on or
landed, the engine steps that computed it (when each was scheduled and came
back, its tokens and who else was in the batch) and its first token; and the
SSD read syscalls that were in flight meanwhile (a late read holding an I/O
thread). All in seconds from the request's ``queued_ts``.
"""

from __future__ import annotations


def _steps(lines: list[dict]) -> list[dict]:
    """Engine steps that ran tokens: scheduled at t0, output back at t1."""
    out, open_step = [], None
    for ln in lines:
        if ln["k"] == "step" and ln["sched"]:
            open_step = {"t0": ln["t0"], "t_sched": ln["t"], "sched": ln["sched"], "computed": ln["computed"]}
            out.append(open_step)
        elif ln["k"] == "step_end" and open_step is not None:
            open_step["t1"] = ln["t"]
            open_step = None
    return out


def _ids(ext: str, names) -> list[str]:
    return [n for n in names if n == ext or n.startswith(ext + "-")]


def timeline(lines: list[dict], result: dict) -> dict | None:
    """The timeline of one request (a runner result with ``request_id`` and ``ts``)."""
    ts, ext = result.get("ts"), result.get("request_id")
    if not ts or ext is None or not all(ts):
        return None
    q = ts[0]
    steps = [s for s in _steps(lines) if _ids(ext, s["sched"])]
    if not steps:
        return None
    rid = _ids(ext, steps[0]["sched"])[0]

    def rel(t):
        return None if t is None else round(t - q, 4)

    promo = [ln for ln in lines if ln["k"] == "promo" and ln["req"] == rid]
    start = next((p for p in promo if p["ev"] == "start"), None)
    end = next((p for p in promo if p["ev"] in ("gave_up", "landed")), None)
    first_token = ts[2]
    reads = [ln for ln in lines if ln["k"] == "read" and ln["t0"] < first_token and ln["t"] > q]
    return {
        "queued_ts": q,
        "promotion_start": rel(start["asked"]) if start else None,
        "promotion_blocks": start["blocks"] if start else 0,
        "deadline_s": round(start["deadline"], 4) if start else None,
        "predicted_load_s": round(start["predicted"], 4) if start and start["predicted"] is not None else None,
        "predicted_recompute_s": round(start["recompute"], 4) if start and start["recompute"] is not None else None,
        "checks": sum(p["ev"] == "wait" for p in promo),
        "ended": end["ev"] if end else None,
        "ended_at": rel(end["t"]) if end else None,
        "reads_landed_at": rel(end["done_at"]) if end and end.get("done_at") else None,
        "steps": [{"scheduled": rel(s["t0"]), "done": rel(s.get("t1")), "tokens": s["sched"][rid],
                   "computed_before": s["computed"][rid],
                   "batch": {k: v for k, v in s["sched"].items() if k != rid}} for s in steps],
        "first_token": rel(first_token),
        "ssd_reads_in_flight": [{"start": rel(r["t0"]), "end": rel(r["t"]), "thread": r["thread"],
                                 "bytes": r["nbytes"]} for r in reads],
    }


def row_timelines(lines: list[dict], results: list[dict]) -> list[dict | None]:
    return [timeline(lines, r) for r in results]
