"""Build a LoRA adapter for a local model, with random weights, in PEFT's format.

No adapter can be downloaded where kvplug is tested, so the LoRA e2e tests
build their own: ``python -m kvplug.tools.tiny_lora MODEL_DIR OUT_DIR [--rank 8] [--seed 0]``.
The adapter targets q_proj, k_proj and v_proj of every layer; ``vllm.LLM(...,
enable_lora=True)`` loads it through ``LoRARequest(name, id, OUT_DIR)``.

PEFT initialises lora_B to zero (the adapter starts as the identity); here both
A and B are random and large enough that the adapted model's K, V and outputs
clearly differ from the base model's, which is what a test of KV isolation
between adapters needs. The result is deterministic for a given model, rank
and seed.
"""

from __future__ import annotations

import argparse
import json
import os

TARGETS = ("q_proj", "k_proj", "v_proj")


def _shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each target projection."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or hidden // heads
    return {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
            "v_proj": (hidden, kv_heads * head_dim)}


def build(model_dir: str | os.PathLike, out_dir: str | os.PathLike, rank: int = 8, seed: int = 0,
          scale: float = 1.0) -> str:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` to ``out_dir``; return it.

    ``scale`` multiplies the adapter's delta (alpha / rank * B @ A); at 1.0 the
    tiny model (``kvplug.tools.tiny_model``) gives other greedy tokens with it.
    """
    import torch
    from safetensors.torch import save_file

    model_dir, out_dir = os.fspath(model_dir), os.fspath(out_dir)
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    if rank <= 0:
        raise ValueError(f"tiny_lora: rank must be positive, got {rank}")
    alpha = 2 * rank  # scaling alpha / rank = 2
    shapes = _shapes(config)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for proj in TARGETS:
            fan_in, fan_out = shapes[proj]
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            # With A ~ N(0, 1/fan_in), x @ A^T has entries of about 1 (x after RMSNorm);
            # B ~ N(0, (1.5 * scale)^2 / rank) and alpha / rank = 2 then give delta outputs
            # of about 3 * scale, ~10x the tiny model's own q/k/v outputs (std 0.02 weights
            # over 256 inputs): enough to change its greedy tokens, not only its logprobs.
            a = torch.randn(rank, fan_in, generator=gen) / fan_in ** 0.5
            b = torch.randn(fan_out, rank, generator=gen) * (1.5 * scale / rank ** 0.5)
            tensors[f"{prefix}.lora_A.weight"] = a.to(torch.bfloat16).contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16).contiguous()
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": model_dir,
        "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": list(TARGETS),
        "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
        "use_rslora": False, "use_dora": False, "inference_mode": True,
    }
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(adapter_config, f, indent=2)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("out_dir")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0)
    a = p.parse_args(argv)
    print(build(a.model_dir, a.out_dir, rank=a.rank, seed=a.seed, scale=a.scale))


if __name__ == "__main__":
    main()
