"""``offload-engine chat MODEL``: multi-turn chat with the model's chat template."""

from __future__ import annotations

import logging
import sys
import threading

from ..errors import ConfigError, ContextLengthError
from .options import (
    add_engine_args,
    add_model_args,
    engine_config_from_args,
    model_from_args,
    not_utf8,
)
from .run_cmd import add_generation_args, check_generation_args, generation_kwargs

logger = logging.getLogger(__name__)
COMMANDS = {"/reset": "start over", "/exit": "quit", "/help": "list the commands"}
HELP = ("type a message; /reset starts over, /exit quits, /help lists commands; "
        "Ctrl-C stops the current reply; arrow keys recall earlier lines")
HISTORY_FILE = "chat_history"  # readline history, in the demo cache folder
HISTORY_LINES = 1000


def register(commands) -> None:
    parser = commands.add_parser(
        "chat", help="chat with a quantized model in the terminal", description=HELP)
    add_model_args(parser)
    parser.add_argument("--system", default=None, help="an optional system message")
    add_generation_args(parser)
    add_engine_args(parser)
    parser.set_defaults(handler=run)


def _read_line() -> str | None:
    try:
        return input("you> ")
    except EOFError:
        return None


def _check_stdin() -> None:
    """chat reads its messages from stdin: refuse a closed one before loading the model,
    and keep undecodable bytes (as surrogates) so that a line of them is refused alone."""
    if sys.stdin is None or sys.stdin.closed:
        raise ConfigError("chat reads messages from standard input, which is closed; run it "
                          "in a terminal or pipe the messages in")
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")


def run(args) -> int:
    from ..decode.api import load

    check_generation_args(args)
    _check_stdin()
    with load(model_from_args(args), engine_config_from_args(args)) as engine:
        print(HELP, file=sys.stderr)
        history = _fresh_history(args)
        with _line_history() as remember:
            while True:
                try:
                    line = _read_line()
                except KeyboardInterrupt:
                    print()
                    continue
                if line is None:
                    return 0
                if not_utf8(line):
                    print(f"(not sent: the line is not valid UTF-8 text, {not_utf8(line)})",
                          file=sys.stderr)
                    continue
                remember(line)
                if line.startswith("/"):
                    if line.strip() == "/exit":
                        return 0
                    history = _run_command(line.strip(), history, args)
                elif line.strip():
                    history = _turn(engine, history, line, args)


def _run_command(command: str, history: list, args) -> list:
    """Handle a /command; unknown ones are reported, never sent to the model."""
    if command == "/reset":
        print("(history cleared)", file=sys.stderr)
        return _fresh_history(args)
    if command == "/help":
        for name, what in COMMANDS.items():
            print(f"  {name:<7} {what}", file=sys.stderr)
        return history
    print(f"unknown command {command.split()[0]}; commands: {', '.join(COMMANDS)} "
          "(start a message with a space to send a leading /)", file=sys.stderr)
    return history


def _turn(engine, history: list, line: str, args) -> list:
    """One user message and its reply; the history returned is what the model saw."""
    from ..decode.context import context_limit, fit_history

    asked = history + [{"role": "user", "content": line}]
    try:
        fitted, dropped = fit_history(engine, asked, args.max_new_tokens,
                                      context_limit(engine, args.ctx_size))
    except ContextLengthError as exc:
        print(f"(not sent: {exc})", file=sys.stderr)
        return history
    if dropped:
        print(f"(dropped the {dropped} oldest message(s) to fit the context)", file=sys.stderr)
    reply = _reply(engine, fitted, args)
    return fitted + [{"role": "assistant", "content": reply}]


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


class _line_history:  # noqa: N801  (used as a context manager, like open)
    """readline line editing and a history file kept across sessions, where readline exists."""

    def __init__(self):
        from ..checkpoint.embedded import cache_root

        self.path = cache_root() / HISTORY_FILE
        try:
            import readline
        except ImportError:  # Windows without pyreadline: plain input()
            readline = None
        self.readline = readline

    def __enter__(self):
        if self.readline is not None and self.path.is_file():
            try:
                self.readline.read_history_file(str(self.path))
            except OSError as exc:
                logger.warning("cannot read the chat history %s: %s", self.path, exc)
        return self._remember

    def _remember(self, line: str) -> None:
        # input() adds lines itself only when reading a terminal; piped input is added here.
        if self.readline is not None and line.strip() and not sys.stdin.isatty():
            self.readline.add_history(line)

    def __exit__(self, *exc_info) -> None:
        if self.readline is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.readline.set_history_length(HISTORY_LINES)
            self.readline.write_history_file(str(self.path))
        except OSError as exc:
            logger.warning("cannot save the chat history to %s: %s", self.path, exc)
