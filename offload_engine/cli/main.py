"""Entry point: builds the parser from the subcommand modules and reports errors in one line."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback

from ..errors import OffloadError
from ..version import __version__

# Subcommand modules, each with register(commands); in the order `--help` lists them.
COMMAND_MODULES = ("quantize_cmd", "inspect_cmd", "run_cmd", "chat_cmd", "demo_cmd",
                   "plan_cmd", "eval_cmd", "serve_cmd", "synth_cmd", "bench_cmd", "calibrate_cmd",
                   "export_cmd", "trace_summary_cmd")


class DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to a flag's help unless the text already states its default."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        if (action.default in (None, False, argparse.SUPPRESS) or "default" in text.lower()
                or not (action.option_strings or action.nargs in ("?", "*"))):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """Every subcommand's parser: defaults shown in --help, llama.cpp style."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="offload-engine",
        description="Run large language models on small GPUs by streaming INT4 weights.",
    )
    parser.add_argument("--version", action="version", version=f"offload-engine {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=Parser)
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
        code = int(args.handler(args) or 0)
        sys.stdout.flush()  # a closed pipe shows up here, not at interpreter exit
        return code
    except BrokenPipeError:
        # `plan --json | head`: the reader left. Point stdout at devnull so the exit-time
        # flush cannot raise again, and say so in one line.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout replaced by an object without a descriptor
            pass
        print("offload-engine: error: output closed early (broken pipe)", file=sys.stderr)
        return 2
    except OffloadError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"offload-engine: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("offload-engine: interrupted", file=sys.stderr)
        return 130
