"""The ``kvplug`` command: serve, demo, stats, verify, bench run/report.

One file per subcommand; each has ``add_parser(subparsers)`` and ``run(args) -> int``.
Nothing here imports vLLM at module level: the commands that need it import it
when they run.
"""

from __future__ import annotations

import argparse
import sys

from kvplug.cli import bench, demo, serve, stats, verify

COMMANDS = (serve, demo, stats, verify, bench)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvplug", description="kvplug: a CPU + SSD KV-cache tier for vLLM.",
        epilog="Run 'kvplug COMMAND --help' for a command's options.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # every option after MODEL is vLLM's: hand them over unparsed
        return serve.main(argv[1:])
    args = parser().parse_args(argv)
    return args.run(args) or 0
