"""What an engine process allocated after warm-up and never freed, by native and Python stack.

    python bench/soak/native_leaks.py WORKDIR [--top 15] [--out FILE.json]

Reads the memray captures the soak's ``--memray`` left under WORKDIR/soak/probe-*/ (one per
EngineCore and worker, tracking from warm-up to the end) and prints, for each, the allocation
sites still holding the most bytes when tracking stopped: the growth, with where it came from.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def leaks(path: Path, top: int, depth: int = 12) -> dict:
    import memray

    with memray.FileReader(str(path)) as reader:
        meta = reader.metadata
        recs = sorted(reader.get_leaked_allocation_records(merge_threads=True), key=lambda r: -r.size)
        total = sum(r.size for r in recs)
        by_origin: dict[str, list[int]] = {}
        for r in recs:
            o = by_origin.setdefault(origin(r), [0, 0])
            o[0] += r.size
            o[1] += r.n_allocations
        rows = []
        for r in recs[:top]:
            try:
                native = [f"{fn} {f.rsplit('/', 1)[-1]}:{ln}" for fn, f, ln in r.hybrid_stack_trace(max_stacks=depth)]
            except NotImplementedError:
                native = [f"{fn} {f}:{ln}" for fn, f, ln in r.stack_trace(max_stacks=depth)]
            rows.append({"bytes": r.size, "allocations": r.n_allocations, "allocator": str(r.allocator),
                         "stack": native})
    try:
        name = json.loads(path.with_name(f"probe-{meta.pid}.json").read_text()).get("name")
    except (OSError, ValueError):
        name = None
    return {"file": str(path), "pid": meta.pid, "process": name, "engine": path.parent.name.removeprefix("probe-"),
            "leaked_bytes": total, "by_origin": {k: {"bytes": b, "allocations": n} for k, (b, n) in by_origin.items()},
            "top": rows}


def origin(record) -> str:
    """Whose allocation: kvplug's (a kvplug frame on its stack), oneDNN's (GEMM primitives), else other."""
    try:
        frames = record.hybrid_stack_trace()
    except NotImplementedError:
        frames = record.stack_trace()
    where = " ".join(f"{fn} {f}" for fn, f, _ in frames)
    if "/kvplug/" in where or "/connectors/vllm/" in where:
        return "kvplug"
    if "dnnl" in where:
        return "onednn"
    return "other"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", default=None, help="also write the answer here")
    args = p.parse_args(argv)
    from kvplug.bench.environment import machine

    out = {"what": "allocations made after warm-up and never freed, per engine process (memray, native stacks), "
                   "by origin: kvplug (a kvplug frame on the stack), onednn (oneDNN GEMM primitives), other. "
                   "Bytes are allocation sizes, not resident pages (oneDNN maps its JIT code in 256 KiB pieces "
                   "and touches part of each)",
           "command": "python bench/soak.py --requests 1200 --memray ...; python bench/soak/native_leaks.py WORKDIR",
           "machine": machine(), "load_avg": list(os.getloadavg()),
           "processes": [leaks(f, args.top) for f in sorted(Path(args.workdir).glob("**/probe-*/memray-*.bin"))]}
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return out


if __name__ == "__main__":
    main()
