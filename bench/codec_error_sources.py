"""Where a model's int4kc error comes from, in perplexity (restored prefix of 256, 128-token blocks).

Each variant changes one thing of int4kc/128 (simulated in plain torch: K
per channel over the block, V per token after the Hadamard rotation, fp16
scales and zeros): K or V alone coded, finer key token groups, token 0 (the
attention sink) exact, MSE-chosen clipping, finer value groups, layer 0 or
the last layer exact; then kvplug's int4kcs (the real CPU path).

    python bench/codec_error_sources.py [smollm2|qwen2] [variant,...]
        -> bench/results/codec_error_sources.json (perplexity vs exact, %)
"""
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import codec_perplexity as cp  # noqa: E402
import kv_codecs  # noqa: E402

from kvplug import codec_reference as ref  # noqa: E402

def q4(x, dim, clip=1.0):
    """asymmetric 4-bit min-max over dim (fp16 scale/zero), range shrunk by clip about the midpoint."""
    x = x.float()
    mn, mx = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    if clip != 1.0:
        mid = (mn + mx) / 2
        mn, mx = mid + (mn - mid) * clip, mid + (mx - mid) * clip
    s = ((mx - mn) / 15).half().float(); z = mn.half().float()
    inv = torch.where(s > 0, 1 / s, 0.0)
    q = ((x - z) * inv + 0.5).clamp(0, 15.5).floor()
    return q * s + z

def q4_mse(x, dim, grid=(1.0, .95, .9, .85, .8, .75, .7)):
    best, err = None, None
    for c in grid:
        y = q4(x, dim, c); e = ((y - x.float()) ** 2).sum(dim, keepdim=True)
        if best is None: best, err = y, e
        else:
            m = e < err; best = torch.where(m, y, best); err = torch.where(m, e, err)
    return best

def keys_kc(k, T=128, tg=None, mse=False, exact_tok=None, skip_tok0=False):
    """k [t,h,d] -> per-channel code over groups of tg tokens inside blocks of T."""
    t, h, d = k.shape; tg = tg or T
    pad = -t % tg
    x = k.float()
    if pad: x = torch.cat((x, x[-1:].expand(pad, h, d)))
    xs = x.reshape(-1, tg, h, d)
    if skip_tok0:  # token 0 kept out of group 0's range (stored exactly)
        g0 = xs[0].clone(); g0[0] = g0[1]; xs = xs.clone(); xs[0] = g0
    y = (q4_mse(xs, 1) if mse else q4(xs, 1)).reshape(-1, h, d)[:t]
    if skip_tok0: y[0] = k[0].float()
    return y.to(k.dtype)

def vals_h(v, group=0, mse=False, hb=None):
    t, h, d = v.shape; g = group or d
    y = ref.fwht(v.float(), hb or ref.hadamard_block(d)).reshape(t, h, d // g, g)
    yq = (q4_mse(y, -1) if mse else q4(y, -1)).reshape(t, h, d)
    return ref.fwht(yq, hb or ref.hadamard_block(d)).to(v.dtype)

class Hook(cp.KVHook):
    def __call__(self, module, query, key, value, attention_mask, **kw):
        self.layer = module.layer_idx
        return super().__call__(module, query, key, value, attention_mask, **kw)

def variants(hook, L):
    kc = lambda k, v: kv_codecs.through_codec("int4kc", k, v, 128)
    V = {
        "int4kc128": kc,
        "sim_kc128": lambda k, v: (keys_kc(k), vals_h(v)),
        "K_only": lambda k, v: (keys_kc(k), v),
        "V_only": lambda k, v: (k, vals_h(v)),
        "K_tg16": lambda k, v: (keys_kc(k, tg=16), vals_h(v)),
        "K_tg32": lambda k, v: (keys_kc(k, tg=32), vals_h(v)),
        "tok0_exact": lambda k, v: (keys_kc(k, skip_tok0=True), torch.cat((v[:1], vals_h(v)[1:]))),
        "tok0K_exact": lambda k, v: (keys_kc(k, skip_tok0=True), vals_h(v)),
        "K_mse": lambda k, v: (keys_kc(k, mse=True), vals_h(v)),
        "V_mse": lambda k, v: (keys_kc(k), vals_h(v, mse=True)),
        "KV_mse": lambda k, v: (keys_kc(k, mse=True), vals_h(v, mse=True)),
        "V_g32": lambda k, v: (keys_kc(k), vals_h(v, group=32)),
        "L0_exact": lambda k, v: (k, v) if hook.layer == 0 else (keys_kc(k), vals_h(v)),
        "Llast_exact": lambda k, v: (k, v) if hook.layer == L - 1 else (keys_kc(k), vals_h(v)),
        "int4kcs128": lambda k, v: kv_codecs.through_codec("int4kcs", k, v, 128),
    }
    return V

def main(model="smollm2", names=None, windows=8):
    cp.ensure_installed([model])
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
    hook = Hook(); hook.prefix = 256
    AttentionInterface.register("kvplug_codec", hook)
    path, gguf, info = cp.model_files(model)
    tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    lm = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=torch.float32, attn_implementation="kvplug_codec").eval()
    wins = cp.windows(tok, windows, 512)
    caps = cp.capture(lm, wins, hook)
    L = lm.config.num_hidden_layers
    hook.code = lambda k, v: (k, v)
    ex = cp.perplexity(lm, wins, hook, caps); print("exact", ex, flush=True)
    V = variants(hook, L)
    res = {}
    for n in (names or V):
        hook.code = V[n]; t0 = time.time()
        p = cp.perplexity(lm, wins, hook, caps)
        res[n] = round(100 * (p / ex - 1), 3)
        print(n, round(p, 4), res[n], "%", round(time.time() - t0, 1), "s", flush=True)
    return {"model": info, "exact_perplexity": round(ex, 4), "vs_exact_pct": res}


if __name__ == "__main__":
    load = open("/proc/loadavg").read().split()[:3]
    model = sys.argv[1] if len(sys.argv) > 1 else "smollm2"
    r = main(model, sys.argv[2].split(",") if len(sys.argv) > 2 else None)
    r["machine"] = (f"{platform.machine()} CPU ({os.cpu_count()} cores, shared), torch {torch.__version__}, "
                    f"load average at start {' '.join(load)}")
    r["method"] = ("8 windows of 512 tokens of pydoc_data.topics, the first 256 tokens' exact K/V coded and "
                   "restored, perplexity over the predictions after them (as bench/codec_perplexity.py "
                   "--restored-prefix 256)")
    out = Path(__file__).parent / "results" / "codec_error_sources.json"
    out.write_text(json.dumps({model: r}, indent=2) + "\n")
    print(json.dumps(r, indent=2))
