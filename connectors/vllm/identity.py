"""What a stored block's bytes depend on, beyond its tokens.

Two digests decide whether a block may be loaded for a request:

- ``model_fingerprint`` (per engine): everything that determines the KV bytes
  of a token sequence for the base model: vLLM's model config hash, the model's
  HF config (RoPE scaling and other ``hf_overrides`` land there), a cheap
  digest of the weight files (size, mtime, ctime, inode and the first 64 KiB
  of each, so a checkpoint rewritten in place is another model; no full read), quantization, KV cache
  dtype, block size, the parallel split, kvplug's layout, codec and format.
  It is the store's fingerprint: an SSD tier written under another one is
  never read.
- ``request_identity`` (per request): what vLLM's own prefix cache separates
  requests on (``vllm/v1/core/kv_cache_utils.py``: LoRA name and path, cache
  salt), plus a digest of the LoRA adapter's files, since a name re-pointed
  or an adapter rewritten in place changes the KV. ``None`` means kvplug
  cannot key the request safely (prompt embeddings, multimodal inputs, a LoRA
  adapter whose files it cannot read): such a request is neither stored nor
  loaded.

Lookups and saves of a request both start from ``request_root``, which also
holds the store's cache epoch (moved on by ``reset_prefix_cache``).
"""

from __future__ import annotations

import json
import logging
import os
from functools import lru_cache

import xxhash

from kvplug.keys import fingerprint

log = logging.getLogger("vllm.kvplug")

HEAD_BYTES = 1 << 16  # bytes of each weight file hashed: headers (safetensors) and a first tensor
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".npz", ".msgpack", ".h5")


def model_fingerprint(vllm_config, layout_desc: dict, codec_desc: dict, codec: str, tp_size: int) -> bytes:
    model = vllm_config.model_config
    cache = vllm_config.cache_config
    hf = getattr(model, "hf_config", None)
    extra = {
        "model_config": model.compute_hash(),
        "hf_config": _digest_json(hf.to_dict()) if hf is not None and hasattr(hf, "to_dict") else None,
        "weights": weights_digest(model.model, getattr(model, "revision", None)),
        "quantization": getattr(model, "quantization", None),
        "dtype": str(getattr(model, "dtype", None)),
        "kv_cache_dtype": str(getattr(cache, "cache_dtype", None)),
        "block_size": getattr(cache, "block_size", None),
        "codec": codec_desc,
        "revision": getattr(model, "revision", None),
    }
    return fingerprint(model.model, layout_desc, codec, rank=0, world_size=tp_size, extra=extra)


def weights_digest(model: str, revision: str | None = None) -> str:
    """Stat and the first ``HEAD_BYTES`` of every weight and config file of a local
    model directory (or of its local Hugging Face snapshot); "unresolved:<name>" when
    neither is on this machine (the revision, in the fingerprint too, then stands for it)."""
    path = model if os.path.isdir(model) else _hf_snapshot(model, revision)
    if path is None:
        return f"unresolved:{model}"
    return _files_digest(path, WEIGHT_SUFFIXES + (".json",))


def _hf_snapshot(repo: str, revision: str | None) -> str | None:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo, revision=revision, local_files_only=True)
    except Exception:  # not cached here, or no huggingface_hub: nothing to read
        return None


def _files_digest(path: str, suffixes: tuple[str, ...]) -> str:
    h = xxhash.xxh3_128()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not name.endswith(suffixes) or not os.path.isfile(full):
            continue
        st = os.stat(full)
        # ctime and inode too: a rewrite that restores the old mtime still moves the ctime
        stamp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        h.update(f"{name}\0{stamp}\0".encode())
        h.update(_head(full, stamp))
    return h.hexdigest()


@lru_cache(maxsize=256)
def _head(path: str, stamp: tuple) -> bytes:
    """A digest of a file's first bytes (cached by its stat: a request must not reread them)."""
    with open(path, "rb") as f:
        return xxhash.xxh3_128_digest(f.read(HEAD_BYTES))


def _digest_json(doc) -> str:
    return xxhash.xxh3_128_hexdigest(json.dumps(doc, sort_keys=True, default=str).encode())


# -- per request ------------------------------------------------------------------


class Unkeyable(Exception):
    """A request whose KV the token ids (and what kvplug can read) do not determine."""


def request_identity(request) -> tuple:
    """What, besides the tokens and the model, the request's KV depends on; raises Unkeyable."""
    if getattr(request, "prompt_embeds", None) is not None:
        raise Unkeyable("prompt_embeds")
    if getattr(request, "mm_features", None):
        raise Unkeyable("multimodal")
    lora = getattr(request, "lora_request", None)
    adapter = None
    if lora is not None:
        adapter = (lora.lora_name, lora.lora_path, lora_digest(lora.lora_path))
    return (adapter, request.cache_salt or None)


def lora_digest(path: str) -> str:
    if not path or not os.path.isdir(path):
        raise Unkeyable("lora_unreadable")
    try:
        return _files_digest(path, WEIGHT_SUFFIXES + (".json",))
    except OSError:
        raise Unkeyable("lora_unreadable") from None


def request_root(store_root: bytes, epoch: bytes, identity: tuple) -> bytes:
    """The parent key of a request's first block: the store, its epoch and the request's identity."""
    return xxhash.xxh3_128_digest(store_root + epoch + json.dumps(identity).encode())
