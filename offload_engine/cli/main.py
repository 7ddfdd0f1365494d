"""Entry point: builds the parser from the subcommand modules and reports errors in one line."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from .. import __version__
from ..errors import OffloadError
from . import inspect_cmd, quantize_cmd

SUBCOMMANDS = [quantize_cmd, inspect_cmd]


def _optional_subcommands():
    """Subcommands whose modules pull in the runtime (imported lazily for a fast --help)."""
    from . import chat_cmd, demo_cmd, run_cmd

    return [run_cmd, chat_cmd, demo_cmd]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="offload-engine",
        description="Run large language models on small GPUs by streaming INT4 weights.",
    )
    parser.add_argument("--version", action="version", version=f"offload-engine {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS + _optional_subcommands():
        module.register(commands)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args) or 0)
    except OffloadError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"offload-engine: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("offload-engine: interrupted", file=sys.stderr)
        return 130
