"""Build a small local Llama with random weights and a freshly trained BPE tokenizer.

No model can be downloaded where kvplug is tested, so tests and benches build
their own: ``python -m kvplug.tools.tiny_model DIR [--size tiny|bench]``.
The result is deterministic for a given size and seed, and ``vllm.LLM(DIR)``
serves it like any Hugging Face checkpoint.

The default init (std 0.02) gives near-uniform logits and the same greedy
token for every prompt; embeddings and lm_head get a larger std so that
greedy outputs depend on the prompt and top-k logprobs are well separated.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import asdict, dataclass

SIZES = {
    # 4 layers, 2 KV heads x 64: the shape the e2e tests use (fast to start).
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=2048,
                 max_position_embeddings=4096),
    # ~90M parameters: the TTFT bench model.
    "bench": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=4, vocab_size=8192,
                  max_position_embeddings=8192),
}

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@dataclass(frozen=True)
class TinyModelSpec:
    size: str = "tiny"
    seed: int = 0
    embed_std: float = 1.0   # std of embed_tokens and lm_head (default init: 0.02)
    dtype: str = "bfloat16"


def corpus(seed: int, n_lines: int = 4000) -> list[str]:
    """Deterministic pseudo-English text to train the tokenizer on."""
    rng = random.Random(seed)
    onsets = ["b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
              "st", "tr", "pl", "ch", "sh", "th", "gr", "br"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io"]
    codas = ["", "", "n", "r", "s", "t", "l", "nd", "ng", "st", "rk"]
    words = ["".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                     for _ in range(rng.randint(1, 3))) for _ in range(3000)]
    words += ["the", "of", "and", "to", "a", "in", "is", "that", "for", "it", "with", "as"]
    punct = [".", ",", "?", "!", ";", ":"]
    lines = []
    for _ in range(n_lines):
        n = rng.randint(5, 30)
        text = " ".join(rng.choice(words) for _ in range(n))
        lines.append(text + rng.choice(punct) + " " + str(rng.randint(0, 9999)))
    return lines


def train_tokenizer(vocab_size: int, seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>", chat_template=CHAT_TEMPLATE,
    )


def build(path: str | os.PathLike, spec: TinyModelSpec = TinyModelSpec()) -> str:
    """Write config, weights (safetensors) and tokenizer to ``path``; return it.

    Skips the work when ``path`` already holds a model built from the same spec.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = os.fspath(path)
    stamp = os.path.join(path, "kvplug_tiny_model.json")
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == asdict(spec):
                return path
    if spec.size not in SIZES:
        raise ValueError(f"tiny_model: size {spec.size!r} is not known; expected one of {sorted(SIZES)}")
    os.makedirs(path, exist_ok=True)

    tokenizer = train_tokenizer(SIZES[spec.size]["vocab_size"], spec.seed)
    params = dict(SIZES[spec.size], vocab_size=len(tokenizer))
    config = LlamaConfig(
        **params, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, torch_dtype=spec.dtype,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, spec.embed_std)
        # lm_head scaled by 1/sqrt(hidden) keeps logits O(embed_std): peaked, not saturated.
        model.lm_head.weight.normal_(0.0, spec.embed_std / params["hidden_size"] ** 0.5 * 4)
    model.to(getattr(torch, spec.dtype)).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    with open(stamp, "w") as f:
        json.dump(asdict(spec), f)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path")
    p.add_argument("--size", default="tiny", choices=sorted(SIZES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--embed-std", type=float, default=TinyModelSpec.embed_std)
    a = p.parse_args(argv)
    print(build(a.path, TinyModelSpec(size=a.size, seed=a.seed, embed_std=a.embed_std)))


if __name__ == "__main__":
    main()
