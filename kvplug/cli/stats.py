"""``kvplug stats URL_OR_SSD_PATH``: what kvplug holds and how well it hits.

From a running server (its base URL or /metrics URL): kvplug's counters since
the server started (tokens looked up, hit per tier, bytes loaded and saved,
errors) beside vLLM's own prefix cache. From an SSD tier directory (read only;
its engine may be running): blocks and bytes per model fingerprint.
"""

from __future__ import annotations

import argparse
import json
import os


def add_parser(sub) -> None:
    p = sub.add_parser("stats", help="kvplug's counters from a server's /metrics, or an SSD directory's contents",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="http://HOST:PORT[/metrics] of a 'kvplug serve', or an ssd_path directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)


def from_server(url: str) -> dict:
    from kvplug.bench import metrics

    samples = metrics.scrape(url)
    kv = metrics.kvplug_counters(samples)
    if not kv and not any(k.startswith(metrics.KVPLUG) for k in samples):
        raise LookupError(f"{url} exports no vllm:kvplug_* metrics: is kvplug enabled in that server?")
    return {"source": url, "kvplug": metrics.summary(kv), "counters": kv, "vllm": metrics.vllm_counters(samples)}


def from_ssd(path: str) -> dict:
    from kvplug.tiers import ssd_dir
    from kvplug.tiers.ssd_verify import read_manifest

    db = os.path.join(path, ssd_dir.MANIFEST)
    if not os.path.exists(db):
        raise FileNotFoundError(f"{path}: no kvplug SSD tier here (no {ssd_dir.MANIFEST})")
    geometry, rows = read_manifest(db)
    by_model: dict[str, int] = {}
    for r in rows:
        fp = r[6].hex()[:16] if isinstance(r[6], bytes) else "?"
        by_model[fp] = by_model.get(fp, 0) + 1
    segments = [f for f in os.listdir(path) if f.startswith("segment-")]
    disk = sum(os.path.getsize(os.path.join(path, f)) for f in segments)
    block_bytes = geometry.get("block_bytes", 0)
    return {"source": path, "blocks": len(rows), "block_bytes": block_bytes, "bytes": len(rows) * block_bytes,
            "segment_files": len(segments), "disk_bytes": disk, "blocks_per_fingerprint": by_model}


def run(args) -> int:
    try:
        out = from_server(args.source) if "://" in args.source else from_ssd(args.source)
    except (OSError, LookupError, ValueError) as e:
        print(f"kvplug stats: {e}")
        return 2
    if args.json:
        print(json.dumps(out, indent=1))
    elif "kvplug" in out:
        s, v = out["kvplug"], out["vllm"]
        print(f"{out['source']}")
        print(f"  looked up  {s['lookup_tokens']:,.0f} tokens beyond vLLM's own prefix cache")
        print(f"  hit        {s['hit_tokens']:,.0f} tokens ({s['hit_rate']:.1%}): CPU tier "
              f"{s['hit_tokens_cpu']:,.0f} ({s['hit_rate_cpu']:.1%}), SSD tier {s['hit_tokens_ssd']:,.0f} "
              f"({s['hit_rate_ssd']:.1%})")
        print(f"  blocks     stored {s['stored_blocks']:,.0f}, loaded {s['loaded_blocks']:,.0f}")
        print(f"  bytes      saved {s['save_bytes'] / 2**20:,.1f} MiB, loaded {s['load_bytes'] / 2**20:,.1f} MiB "
              f"(vLLM's KV cache <-> CPU tier); SSD read {s['ssd_read_bytes'] / 2**20:,.1f} / wrote "
              f"{s['ssd_write_bytes'] / 2**20:,.1f} MiB; remote read {s['remote_read_bytes'] / 2**20:,.1f} / "
              f"wrote {s['remote_write_bytes'] / 2**20:,.1f} MiB")
        print(f"  errors     {s['errors']:,.0f} (failed loads and promotions, promotion timeouts)")
        if v.get("prefix_cache_queries"):
            print(f"  vLLM's own prefix cache: {v['prefix_cache_hits']:,.0f} of {v['prefix_cache_queries']:,.0f} "
                  f"tokens ({v['prefix_cache_hits'] / v['prefix_cache_queries']:.1%})")
    else:
        print(f"{out['source']}: {out['blocks']:,} blocks of {out['block_bytes']:,} bytes "
              f"({out['bytes'] / 2**20:,.1f} MiB) in {out['segment_files']} segment files "
              f"({out['disk_bytes'] / 2**20:,.1f} MiB on disk)")
        for fp, n in out["blocks_per_fingerprint"].items():
            print(f"  model fingerprint {fp}: {n:,} blocks")
    return 0
