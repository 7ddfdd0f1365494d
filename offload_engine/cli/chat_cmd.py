"""``offload-engine chat MODEL``: multi-turn chat with the model's chat template."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from .options import add_engine_args, engine_config_from_args
from .run_cmd import add_generation_args, generation_kwargs

HELP = "type a message; /reset starts over, /exit quits; Ctrl-C stops the current reply"


def register(commands) -> None:
    parser = commands.add_parser(
        "chat", help="chat with a quantized model in the terminal", description=HELP)
    parser.add_argument("model", type=Path, help="a directory written by `quantize`")
    parser.add_argument("--system", default=None, help="an optional system message")
    add_generation_args(parser)
    add_engine_args(parser)
    parser.set_defaults(handler=run)


def _read_line() -> str | None:
    try:
        return input("you> ")
    except EOFError:
        return None


def run(args) -> int:
    from ..decode.api import load

    with load(args.model, engine_config_from_args(args)) as engine:
        print(HELP, file=sys.stderr)
        history = _fresh_history(args)
        while True:
            try:
                line = _read_line()
            except KeyboardInterrupt:
                print()
                continue
            if line is None or line.strip() == "/exit":
                return 0
            if line.strip() == "/reset":
                history = _fresh_history(args)
                print("(history cleared)", file=sys.stderr)
                continue
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            reply = _reply(engine, history, args)
            history.append({"role": "assistant", "content": reply})


def _fresh_history(args) -> list:
    return [{"role": "system", "content": args.system}] if args.system else []


def _reply(engine, history: list, args) -> str:
    """Generate one reply; Ctrl-C ends the reply, not the program."""
    stop = threading.Event()
    pieces: list = []

    def show(text: str) -> None:
        pieces.append(text)
        sys.stdout.write(text)
        sys.stdout.flush()

    sys.stdout.write("bot> ")
    try:
        result = engine.generate(messages=history, on_text=show, stop_event=stop,
                                 **generation_kwargs(args))
        print()
        print(result.stats.line(), file=sys.stderr)
        return result.text
    except KeyboardInterrupt:
        stop.set()
        print("\n(reply stopped)", file=sys.stderr)
        return "".join(pieces)
