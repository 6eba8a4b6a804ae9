"""What a stored block's bytes depend on, beyond its tokens.

Two digests decide whether a block may be loaded for a request:

- ``model_fingerprint`` (per engine): everything that determines the KV bytes
  of a token sequence for the base model: the model config fields that change
  KV, the model's HF config (RoPE scaling and ``hf_overrides`` land there), a
  cheap digest of the weight files (size, mtime and the first and last 64 KiB
  of each, so a checkpoint rewritten in place is another model; no full read), quantization, KV cache
  dtype, block size, the parallel split, kvplug's layout, codec and format.
  It is the store's fingerprint: an SSD tier written under another one is
  never read.
- ``request_identity`` (per request): what vLLM's own prefix cache separates
  requests on (``vllm/v1/core/kv_cache_utils.py``: LoRA name and path, cache
  salt), plus the adapter's int id (vLLM's workers cache adapters by it) and a
  digest of its files, since a name re-pointed changes the KV. An adapter
  rewritten in place is served by vLLM's workers from their cache until it is
  reloaded (``load_inplace``): give a rewritten adapter a new name or id. ``None`` means kvplug
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

from kvplug.keys import fingerprint, hash_key

log = logging.getLogger("vllm.kvplug")

HEAD_BYTES = 1 << 16  # bytes hashed at each end of a weight file: headers (safetensors), first and last tensors
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".npz", ".msgpack", ".h5")


def model_fingerprint(vllm_config, layout_desc: dict, codec_desc: dict, codec: str, tp_size: int) -> bytes:
    model = vllm_config.model_config
    cache = vllm_config.cache_config
    hf = getattr(model, "hf_config", None)
    download_dir = getattr(getattr(vllm_config, "load_config", None), "download_dir", None)
    # Only what changes the KV bytes: a new max_model_len or a re-downloaded copy of the
    # same files must not make a persistent store a miss.
    extra = {
        "model": {name: str(getattr(model, name, None)) for name in MODEL_FIELDS},
        "hf_config": _digest_json(hf.to_dict()) if hf is not None and hasattr(hf, "to_dict") else None,
        "weights": weights_digest(model.model, getattr(model, "revision", None), download_dir),
        "kv_cache_dtype": str(getattr(cache, "cache_dtype", None)),
        "block_size": getattr(cache, "block_size", None),
        "codec": codec_desc,
    }
    log.info("kvplug: store fingerprint from %s", json.dumps(extra, sort_keys=True, default=str))
    return fingerprint(model.model, layout_desc, codec, rank=0, world_size=tp_size, extra=extra)


# The model config fields that change KV (the HF config, RoPE scaling and hf_overrides
# included, is digested whole beside them).
MODEL_FIELDS = ("model", "revision", "code_revision", "dtype", "quantization", "hf_overrides",
                "override_attention_dtype")


def weights_digest(model: str, revision: str | None = None, download_dir: str | None = None) -> str:
    """Size, mtime and the first and last ``HEAD_BYTES`` of every weight and config file of a
    local model directory (a single model file, or the local Hugging Face snapshot vLLM loads,
    in ``download_dir`` when given). A model whose files are not on this machine gets a
    digest of its own for this process only: nothing stored is reused after a restart."""
    if os.path.isfile(model):
        return _files_digest(os.path.dirname(model) or ".", (os.path.basename(model),))
    path = model if os.path.isdir(model) else _hf_snapshot(model, revision, download_dir)
    if path is None:
        log.warning("kvplug: the weight files of %s are not on this machine; the persistent tiers will not be "
                    "reused after a restart (their fingerprint cannot name these weights)", model)
        return f"unresolved:{model}:{_PROCESS_NONCE}"
    return _files_digest(path, WEIGHT_SUFFIXES + (".json",))


_PROCESS_NONCE = os.urandom(8).hex()


def _hf_snapshot(repo: str, revision: str | None, cache_dir: str | None = None) -> str | None:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except Exception:  # not cached here, or no huggingface_hub: nothing to read
        return None


def _files_digest(path: str, suffixes: tuple[str, ...]) -> str:
    h = xxhash.xxh3_128()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not name.endswith(suffixes) or not os.path.isfile(full):
            continue
        st = os.stat(full)
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        # cached by the whole stat: a rewrite that restores the old mtime still moves the ctime
        h.update(_ends(full, (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)))
    return h.hexdigest()


@lru_cache(maxsize=256)
def _ends(path: str, stamp: tuple) -> bytes:
    """A digest of a file's first and last bytes (headers, first and last tensors): no full read."""
    with open(path, "rb") as f:
        head = f.read(HEAD_BYTES)
        f.seek(max(0, stamp[0] - HEAD_BYTES))
        return xxhash.xxh3_128_digest(head + f.read(HEAD_BYTES))


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
        # vLLM's workers cache an adapter by its int id (reloaded only with load_inplace):
        # the id is part of what the KV was computed with.
        adapter = (lora.lora_name, lora.lora_int_id, lora.lora_path, lora_digest(lora.lora_path))
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
    return hash_key(store_root + epoch + json.dumps(identity).encode())
