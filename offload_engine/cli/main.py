"""Entry point: builds the parser from the subcommand modules and reports errors in one line."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

from ..errors import OffloadError
from ..version import __version__

# Subcommand modules, each with register(commands); in the order `--help` lists them.
COMMAND_MODULES = ("quantize_cmd", "inspect_cmd", "run_cmd", "chat_cmd", "demo_cmd",
                   "plan_cmd", "eval_cmd", "serve_cmd", "synth_cmd", "bench_cmd", "calibrate_cmd")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="offload-engine",
        description="Run large language models on small GPUs by streaming INT4 weights.",
    )
    parser.add_argument("--version", action="version", version=f"offload-engine {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f".{name}", __package__).register(commands)
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
