"""``vllm serve MODEL --kv-connector kvplug --kvplug-cpu-bytes 8GiB ...``

The same settings as ``--kv-transfer-config '{"kv_connector": "kvplug",
"kv_role": "kv_both", "kv_connector_extra_config": {...}}'``, spelled as
options. vLLM loads general plugins just before it builds its parser but hands
them no parser, so ``install`` wraps ``EngineArgs.add_cli_args`` (to add the
options) and ``EngineArgs.from_cli_args`` (to turn them into that
kv_transfer_config). Without those hooks it logs once; the JSON form works
regardless.
"""

from __future__ import annotations

import argparse
import logging

from kvplug.config import KVPlugConfig

log = logging.getLogger("vllm.kvplug")  # under vLLM's logger: its handlers and format

# KVPlugConfig key -> (option, help)
OPTIONS = {
    "cpu_bytes": ("--kvplug-cpu-bytes", 'CPU tier size (shared memory), e.g. "8GiB".'),
    "ssd_path": ("--kvplug-ssd-path", "Directory of the persistent SSD tier (off when not given)."),
    "ssd_bytes": ("--kvplug-ssd-bytes", 'SSD tier size, e.g. "100GiB".'),
    "codec": ("--kvplug-codec", '"raw" (bit-exact), "int4h" (Hadamard-rotated INT4, ~3.7x smaller) or '
                                '"int4kc" (INT4, keys per channel: for models with key biases such as Qwen2), '
                                '"int4kcs" (int4kc, each block\'s first token\'s keys exact: the attention sink).'),
}


def add_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("kvplug", "KV cache offloading to CPU memory and SSD (kvplug plugin).")
    group.add_argument("--kv-connector", choices=["kvplug"], default=None,
                       help="Shortcut for --kv-transfer-config with kv_connector=kvplug, kv_role=kv_both and "
                            "kv_load_failure_policy=recompute; settings from the --kvplug-* options.")
    for key, (flag, help_text) in OPTIONS.items():
        group.add_argument(flag, dest=f"kvplug_{key}", default=None, help=help_text)
    return parser


def kv_transfer_config(args: argparse.Namespace):
    """The kv_transfer_config the options ask for (the one given, when they ask for nothing)."""
    from vllm.config import KVTransferConfig

    given = getattr(args, "kv_transfer_config", None)
    extra = {key: getattr(args, f"kvplug_{key}") for key in OPTIONS if getattr(args, f"kvplug_{key}", None) is not None}
    if getattr(args, "kv_connector", None) is None:
        if extra:
            raise ValueError(f"kvplug: {', '.join(OPTIONS[k][0] for k in extra)} need --kv-connector kvplug")
        return given
    if given is not None and given.kv_connector not in (None, "kvplug"):
        raise ValueError(f"kvplug: --kv-connector kvplug conflicts with --kv-transfer-config "
                         f"(kv_connector={given.kv_connector!r}); give one of them")
    extra = {**(given.kv_connector_extra_config if given is not None else {}), **extra}
    KVPlugConfig.load(extra)  # a bad value fails here, with kvplug's message
    return KVTransferConfig(kv_connector="kvplug", kv_role="kv_both", kv_load_failure_policy="recompute",
                            kv_connector_extra_config=extra)


def install() -> None:
    try:
        from vllm.engine.arg_utils import EngineArgs

        add_cli_args = EngineArgs.add_cli_args
        from_cli_args = EngineArgs.from_cli_args.__func__
    except (ImportError, AttributeError):
        _warn_no_hook()
        return
    if getattr(add_cli_args, "_kvplug", False):
        return

    def add_cli_args_with_kvplug(parser):
        return add_options(add_cli_args(parser))

    def from_cli_args_with_kvplug(cls, args):
        args.kv_transfer_config = kv_transfer_config(args)
        return from_cli_args(cls, args)

    add_cli_args_with_kvplug._kvplug = True
    EngineArgs.add_cli_args = staticmethod(add_cli_args_with_kvplug)
    EngineArgs.from_cli_args = classmethod(from_cli_args_with_kvplug)


_warned = False


def _warn_no_hook() -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("kvplug: this vLLM offers no way to add --kv-connector/--kvplug-* options; use "
                    "--kv-transfer-config '{\"kv_connector\": \"kvplug\", \"kv_role\": \"kv_both\", "
                    "\"kv_connector_extra_config\": {...}}'")
