"""``kvplug bench report``: plots and the README table, from the serving bench's results files.

Runs of one (workload, concurrency, configuration) repeated are folded into
one row: the median of each latency and throughput figure, and the spread
(max - min over the median) of TTFT p50 and throughput when there is more
than one run; token counts and vLLM's queue/prefill/decode split come from one
run. Ratios are against vLLM alone in the same (workload, concurrency), run
by run: a run against vLLM alone's run of the same ``kvplug bench run``
session and repeat (side by side), the median over the pairs. Results files
from before sessions were recorded are paired by file number (-N against -N)
and marked †; a run with no partner is set against vLLM alone's median,
marked ‡.
"""

from __future__ import annotations

import json
import os
import statistics
from collections import defaultdict
from pathlib import Path

START, END = "<!-- kvplug bench report: start -->", "<!-- kvplug bench report: end -->"
ORDER = ["vllm", "kvplug-raw", "kvplug-int4h", "kvplug-cpu-small", "kvplug-cpu-small-ssd", "lmcache"]


def load(results: Path) -> list[dict]:
    docs = []
    for f in sorted(results.glob("*.json")):
        try:
            doc = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if doc.get("bench") == "serve":
            doc["_file"] = str(f)
            docs.append(doc)
    return docs


def _key(name: str) -> tuple:
    return (ORDER.index(name) if name in ORDER else len(ORDER), name)


def groups(docs: list[dict]) -> dict[tuple[str, int], dict[str, list[dict]]]:
    """{("workload on model", concurrency): {configuration: [runs]}} in a stable order."""
    out: dict = defaultdict(lambda: defaultdict(list))
    for d in docs:
        out[(f"{d['workload']['name']} on {d['model']['name']}", d["concurrency"])][d["config"]["name"]].append(d)
    return {k: dict(sorted(v.items(), key=lambda kv: _key(kv[0]))) for k, v in sorted(out.items())}


def _ok(runs: list[dict]) -> list[dict]:
    return [r for r in runs if r["status"] == "ok"]


def figure(runs: list[dict], get) -> float | None:
    xs = [get(r["summary"]) for r in _ok(runs)]
    return statistics.median(xs) if xs else None


def spread(runs: list[dict], get) -> float | None:
    xs = [get(r["summary"]) for r in _ok(runs)]
    return (max(xs) - min(xs)) / statistics.median(xs) if len(xs) > 1 and statistics.median(xs) else None


def _pair_key(r: dict):
    """(session id, repeat in it); results files without a session: ("file", N)."""
    s = r.get("session")
    return (s["id"], s["rep"]) if s else ("file", r["repeat"])


def pairing(runs: list[dict], base: list[dict]) -> str:
    """How ``paired_ratio`` pairs these runs: "" (every one by session), "†" (some by file number,
    from before sessions were recorded), "‡" (some without a partner: against the median)."""
    keys = {_pair_key(b) for b in _ok(base)}
    marks = {"" if _pair_key(r) in keys and "session" in r else "†" if _pair_key(r) in keys else "‡"
             for r in _ok(runs)} if keys else {""}
    return "".join(m for m in ("†", "‡") if m in marks)


def paired_ratio(runs: list[dict], base: list[dict], get) -> float | None:
    """The median over runs of a figure over the baseline's in the same session and repeat (side by
    side); a run without such a partner is set against the baseline's median."""
    by_key = {_pair_key(r): r for r in _ok(base)}
    median = figure(base, get)
    ratios = []
    for r in _ok(runs):
        partner = by_key.get(_pair_key(r))
        b = get(partner["summary"]) if partner else median
        if b:
            ratios.append(get(r["summary"]) / b)
    return statistics.median(ratios) if ratios else None


def TTFT50(s):
    return s["ttft_s"]["p50"]


def TTFT90(s):
    return s["ttft_s"]["p90"]


def RPS(s):
    return s["throughput_rps"]


def hit_shares(s: dict) -> dict[str, float]:
    """Prompt tokens by where they came from, as fractions of the prompt tokens."""
    prompt = s["prompt_tokens"] or 1
    h = s["hit_tokens"]
    kv = h["kvplug_cpu"] + h["kvplug_ssd"]
    return {"vLLM prefix cache": h["vllm_prefix_cache"] / prompt, "kvplug CPU": h["kvplug_cpu"] / prompt,
            "kvplug SSD": h["kvplug_ssd"] / prompt, "LMCache": max(0.0, h["external"] - kv) / prompt,
            "computed": s["prefill_tokens_computed"] / prompt}


def plot_all(docs: list[dict], out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    g = groups(docs)
    paths = {}
    keys = list(g)
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        names = [n for n, runs in g[key].items() if _ok(runs)]
        p50 = [figure(g[key][n], TTFT50) for n in names]
        p90 = [figure(g[key][n], TTFT90) for n in names]
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], p50, 0.4, label="p50")
        ax.bar([i + 0.2 for i in x], p90, 0.4, label="p90")
        ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("time to first token (s)")
        ax.set_title(f"{key[0]}, concurrency {key[1]}")
        ax.legend()
    fig.tight_layout()
    paths["ttft"] = out / "ttft.png"
    fig.savefig(paths["ttft"], dpi=110)
    plt.close(fig)

    workloads = sorted({w for w, _ in keys})
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4.2), squeeze=False)
    for ax, w in zip(axes[0], workloads):
        names = sorted({n for (wk, _), runs in g.items() if wk == w for n in runs}, key=_key)
        for n in names:
            pts = sorted((c, figure(g[(w, c)][n], RPS)) for (wk, c) in keys if wk == w and n in g[(w, c)])
            pts = [(c, v) for c, v in pts if v is not None]
            if pts:
                ax.plot([c for c, _ in pts], [v for _, v in pts], marker="o", label=n)
        ax.set_xlabel("concurrency")
        ax.set_ylabel("requests / s")
        ax.set_ylim(bottom=0)
        ax.set_title(w)
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths["throughput"] = out / "throughput.png"
    fig.savefig(paths["throughput"], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        names = [n for n, runs in g[key].items() if _ok(runs)]
        shares = [hit_shares(_ok(g[key][n])[0]["summary"]) for n in names]
        bottom = [0.0] * len(names)
        for part in ("vLLM prefix cache", "kvplug CPU", "kvplug SSD", "LMCache", "computed"):
            vals = [s[part] for s in shares]
            ax.bar(range(len(names)), vals, 0.6, bottom=bottom, label=part)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("share of prompt tokens")
        ax.set_title(f"{key[0]}, concurrency {key[1]}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths["hits"] = out / "hits.png"
    fig.savefig(paths["hits"], dpi=110)
    plt.close(fig)
    return paths


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _hits(s: dict) -> str:
    """A connector's hit tokens: kvplug's per tier, or another connector's (LMCache) as vLLM counts them."""
    h = s["hit_tokens"]
    if h["kvplug_cpu"] or h["kvplug_ssd"]:
        return f"CPU {h['kvplug_cpu']:,.0f} / SSD {h['kvplug_ssd']:,.0f}"
    return f"{h['external']:,.0f}" if h["external"] else "-"


def _phases(runs: list[dict]) -> str:
    """Mean seconds a request spent waiting for the running batch, in prefill and in decode (vLLM's own
    histograms; runs before they were recorded show -)."""
    runs = [r for r in runs if "queue_time_s_sum" in r["summary"].get("vllm", {})]
    if not runs:
        return "-"
    v = runs[-1]["summary"]["vllm"]
    n = v.get("requests_success") or 1
    return " / ".join(f"{v[f'{p}_time_s_sum'] / n:.2f}" for p in ("queue", "prefill", "decode"))


def _tpot_ms(s: dict) -> float:
    """Each request's mean gap between tokens, median over requests (files from before per-gap ITL
    was recorded call it ``itl_s``)."""
    return (s["tpot_s"] if "tpot_s" in s else s["itl_s"])["p50"] * 1e3


def _itl(runs: list[dict]) -> str:
    """ITL p50 / p99 over every gap between streamed tokens (ms); - for files that kept only TPOT."""
    runs = [r for r in runs if "tpot_s" in r["summary"]]
    if not runs:
        return "-"
    return (f"{figure(runs, lambda s: s['itl_s']['p50'] * 1e3):.1f} / "
            f"{figure(runs, lambda s: s['itl_s']['p99'] * 1e3):.1f}")


def _bytes(s: dict) -> str:
    """MiB kvplug decoded into vLLM's KV cache / encoded out of it (through the CPU tier), then what the
    SSD and remote tiers read / wrote where they moved anything (results files since per-tier counters)."""
    kv = s.get("kvplug")
    if not kv:
        return "-"
    out = f"{kv['load_bytes'] / 2**20:,.0f} / {kv['save_bytes'] / 2**20:,.0f}"
    for tier in ("ssd", "remote"):
        read, written = kv.get(f"{tier}_read_bytes", 0.0), kv.get(f"{tier}_write_bytes", 0.0)
        if read or written:
            out += f"; {tier} {read / 2**20:,.0f} / {written / 2**20:,.0f}"
    return out


def _rss(runs: list[dict]) -> str:
    """Peak RSS of the server tree (GiB); for LMCache, plus its server's (the sum of the two peaks)."""
    serve = statistics.median(r["peak_rss_bytes"] for r in runs) / 2**30
    if not any("lmcache_peak_rss_bytes" in r for r in runs):
        return f"{serve:.2f}"
    lm = statistics.median(r.get("lmcache_peak_rss_bytes", 0) for r in runs) / 2**30
    return f"{serve + lm:.2f} ({serve:.2f} + LMCache server {lm:.2f})"


def machine_line(m: dict) -> str:
    gpu = m.get("gpu")
    where = (f"GPU {gpu['name']}" + (f" x{gpu['count']}" if gpu.get("count", 1) > 1 else "")) if gpu else "no GPU"
    return (f"Machine: {m['cpu']}, {m['cores']} cores, {where}; vLLM {m['versions']['vllm']}"
            f"{'' if gpu else ' (CPU)'}, torch {m['versions']['torch']}, LMCache {m['versions'].get('lmcache')}. "
            f"Every configuration served by `kvplug serve` with the same thread layout, vLLM prefix caching on "
            f"and the same vLLM KV memory; prompts as token ids, greedy, `ignore_eos`.")


COLUMNS = ["configuration", "TTFT p50 (s)", "TTFT p90 (s)", "p50 vs vLLM", "TPOT p50 (ms)", "ITL p50 / p99 (ms)",
           "req/s", "vs vLLM", "out tok/s", "prefill computed", "connector hit tokens",
           "kvplug MiB loaded / saved", "queue / prefill / decode (s, latest run)", "peak RSS (GiB)",
           "runs, spread", "load avg"]
NOTES = ("TPOT: a request's mean gap between tokens, median over requests; ITL: every gap between streamed "
         "tokens, over all requests (- : results files that kept only TPOT). kvplug MiB loaded / saved: "
         "decoded into and encoded out of vLLM's KV cache through the CPU tier; then, where a tier moved any, "
         "MiB the SSD / remote tier read / wrote (results files before per-tier counters have none). Peak RSS: the server's process tree (for LMCache plus its server's); a shared-memory "
         "slab (kvplug's CPU tier) counts in every process that maps it.")


def markdown(docs: list[dict], plots: dict[str, Path], base: Path = Path(".")) -> str:
    lines, marks = [machine_line(docs[0]["machine"])], set()
    for (w, c), by_config in groups(docs).items():
        first = next(iter(by_config.values()))[0]
        wd = first["workload"]
        base_runs = by_config.get("vllm", [])
        model = first["model"]
        lines += ["", f"**{w}**, concurrency {c} (model: {model['layers']} layers, hidden {model['hidden']}, "
                      f"{model['kv_bytes_per_token']:,} KV bytes per token): {wd['requests']} requests, "
                      f"{wd['prompt_tokens']:,} prompt tokens, "
                      f"working set {wd['unique_tokens']:,} tokens, vLLM KV {first['sizing']['kv_blocks']} blocks "
                      f"({first['sizing']['kv_blocks'] * 128:,} tokens, "
                      f"{wd['unique_tokens'] / (first['sizing']['kv_blocks'] * 128):.1f}x less than the working set); "
                      f"prefill floor {wd['prefill_floor_tokens']:,} tokens.", "",
                  "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        for name, runs in by_config.items():
            ok = _ok(runs)
            if not ok:
                why = runs[0].get("why", "").splitlines()[0][:160] if runs[0].get("why") else runs[0]["status"]
                lines.append(f"| {name} | did not run: {why} |" + " |" * (len(COLUMNS) - 2))
                continue
            p50, rps = figure(runs, TTFT50), figure(runs, RPS)
            mark = pairing(runs, base_runs) if name != "vllm" else ""
            marks |= set(mark)
            s = ok[0]["summary"]
            sp = [spread(runs, TTFT50), spread(runs, RPS)]
            runs_txt = f"{len(ok)}" + (f": TTFT {sp[0]:.0%}, req/s {sp[1]:.0%}" if len(ok) > 1 else "")
            loads = "; ".join(f"{r['load_avg_before'][0]:.1f}-{r['load_avg_after'][0]:.1f}" for r in ok)
            lines.append(
                f"| {name} | {_f(p50, '.3f')} | {_f(figure(runs, TTFT90), '.3f')} | "
                f"{_f(paired_ratio(runs, base_runs, TTFT50), '.2f')}{mark} | "
                f"{_f(figure(runs, _tpot_ms), '.1f')} | {_itl(ok)} | "
                f"{_f(rps, '.3f')} | {_f(paired_ratio(runs, base_runs, RPS), '.2f')}{mark} | "
                f"{_f(figure(runs, lambda s: s['output_tok_s']), '.1f')} | "
                f"{figure(runs, lambda s: s['prefill_tokens_computed']):,.0f} | "
                f"{_hits(s)} | {_bytes(s)} | {_phases(ok)} | {_rss(ok)} | {runs_txt} | {loads} |")
    lines += ["", NOTES]
    if "†" in marks:
        lines.append("† paired with vLLM alone by results file number (-N with -N): these files predate session "
                     "ids, so the report cannot tell whether the pair ran side by side.")
    if "‡" in marks:
        lines.append("‡ no vLLM-alone run in the same session: against vLLM alone's median over its runs.")
    lines.append("")
    for name, title in (("ttft", "TTFT p50/p90 per configuration"), ("throughput", "throughput vs concurrency"),
                        ("hits", "where prompt tokens came from")):
        if name in plots:
            lines.append(f"![{title}]({os.path.relpath(Path(plots[name]).resolve(), base)})")
    return "\n".join(lines)


def write_readme(readme: Path, table: str) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme} has no {START} ... {END} markers (in its Benchmarks section)")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{table}\n{END}{tail}")
