"""``offload-engine run MODEL --prompt TEXT``: one generation, streamed, then a stats line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import ConfigError
from .options import add_engine_args, add_sampling_args, engine_config_from_args, sampling_kwargs
from .outputs import check_output


def add_generation_args(parser) -> None:
    """Generation flags; the short aliases are llama.cpp's (-n, -c)."""
    group = parser.add_argument_group("generation")
    group.add_argument("-n", "--max-new-tokens", type=int, default=128, metavar="N",
                       help="tokens to generate at most")
    group.add_argument("-c", "--ctx-size", type=int, default=None, metavar="N",
                       help="tokens the prompt plus reply may use (default: the model's "
                            "context); chat drops its oldest turns to stay within it")
    add_sampling_args(group)


def check_generation_args(args) -> None:
    """-n and -c, checked before the model loads (the engine would refuse them after)."""
    if args.max_new_tokens < 1:
        raise ConfigError(f"-n/--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.ctx_size is not None and args.ctx_size < 1:
        raise ConfigError(f"-c/--ctx-size must be at least 1, got {args.ctx_size}")


def generation_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, **sampling_kwargs(args))


def register(commands) -> None:
    parser = commands.add_parser(
        "run", help="generate text from a prompt with a quantized model",
        description="Stream a reply to the prompt, then print one stats line. "
                    "Example: offload-engine run DIR \"Hello\" -n 32")
    parser.add_argument("model", type=Path, help="a directory written by `quantize`")
    parser.add_argument("prompt_text", nargs="?", default=None, metavar="PROMPT",
                        help="the prompt text (or -p/--prompt)")
    parser.add_argument("-p", "--prompt", default=None, help="the prompt text")
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt in the model's chat template")
    add_generation_args(parser)
    add_engine_args(parser)
    parser.add_argument("--profile-trace", type=Path, default=None, metavar="FILE",
                        help="write a torch.profiler Chrome trace of the generation")
    parser.add_argument("--stats-json", type=Path, default=None, metavar="FILE",
                        help="write the stats (and cache layout) as JSON")
    parser.set_defaults(handler=run)


def prompt_from_args(args) -> str:
    """The prompt, given positionally or with -p; exactly one, and not blank."""
    if args.prompt is not None and args.prompt_text is not None:
        raise ConfigError("give the prompt once: either positionally or with -p/--prompt")
    prompt = args.prompt if args.prompt is not None else args.prompt_text
    if prompt is None:
        raise ConfigError("no prompt: offload-engine run DIR \"your prompt\" (or -p TEXT)")
    if not prompt.strip():
        raise ConfigError("the prompt is empty; give some text to continue")
    problem = not_utf8(prompt)
    if problem:
        raise ConfigError(f"the prompt is not valid UTF-8 text ({problem}); give text, not "
                          "binary data")
    return prompt


def not_utf8(text: str) -> str:
    """Why ``text`` (from argv or stdin, undecodable bytes kept as surrogates) is not
    UTF-8 text, or "" when it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"byte {ord(text[exc.start]) & 0xFF:#04x} at character {exc.start}"
    return ""


def run(args) -> int:
    from ..decode.api import load
    from ..decode.context import check_prompt_fits
    from ..runtime.profiling import trace_to

    prompt = prompt_from_args(args)
    check_generation_args(args)
    for path, flag in ((args.stats_json, "--stats-json"), (args.profile_trace, "--profile-trace")):
        if path is not None:  # before the model loads and generates, not after
            check_output(path, flag)

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    with load(args.model, engine_config_from_args(args)) as engine:
        check_prompt_fits(engine, prompt, args.chat, args.max_new_tokens, args.ctx_size)
        if engine.synthetic_note:
            print(f"note: {engine.synthetic_note}", file=sys.stderr)
        with trace_to(args.profile_trace):
            result = engine.generate(prompt, chat=args.chat, on_text=show,
                                     **generation_kwargs(args))
        print()
        print(result.stats.line(), file=sys.stderr)
        if args.stats_json is not None:
            payload = {**result.stats.as_dict(), "cache": engine.stats,
                       "budget_bytes": engine.config.budget_bytes()}
            args.stats_json.parent.mkdir(parents=True, exist_ok=True)
            args.stats_json.write_text(json.dumps(payload, indent=1))
    return 0
