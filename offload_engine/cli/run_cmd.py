"""``offload-engine run MODEL --prompt TEXT``: one generation, streamed, then a stats line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import ConfigError
from .options import (
    add_engine_args,
    add_model_args,
    add_prompt_args,
    add_sampling_args,
    engine_config_from_args,
    model_argument,
    model_from_args,
    prompt_from_args,
    sampling_kwargs,
)
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
        description="Stream a reply to the prompt, then print one stats line. A model with "
                    "a chat template answers the prompt as a user message (--raw continues "
                    "the text instead). Example: offload-engine run MODEL \"Explain PCIe\" "
                    "-n 64")
    add_model_args(parser)
    add_prompt_args(parser)
    add_generation_args(parser)
    add_engine_args(parser)
    parser.add_argument("--profile-trace", type=Path, default=None, metavar="FILE",
                        help="write a torch.profiler Chrome trace of the generation "
                             "(quietly: the profiler's own log lines are silenced)")
    parser.add_argument("--profile-steps", type=int, default=None, metavar="N",
                        help="with --profile-trace: trace only the first N forward passes "
                             "(prefill is the first; default: all)")
    parser.add_argument("--stats-json", type=Path, default=None, metavar="FILE",
                        help="write the stats (and cache layout) as JSON")
    parser.set_defaults(handler=run)


def run(args) -> int:
    model_argument(args)  # no model: refused before the prompt is read and torch imported
    from ..decode.api import load
    from ..decode.context import check_prompt_fits
    from ..runtime.profiling import trace_to

    prompt = prompt_from_args(args)
    check_generation_args(args)
    for path, flag in ((args.stats_json, "--stats-json"), (args.profile_trace, "--profile-trace")):
        if path is not None:  # before the model loads and generates, not after
            check_output(path, flag)
    model = model_from_args(args)

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    with load(model, engine_config_from_args(args)) as engine:
        # chat by default where the model has a chat template (--raw: plain completion)
        chat = (args.chat if args.chat is not None
                else bool(getattr(engine.tokenizer, "chat_template", None)))
        check_prompt_fits(engine, prompt, chat, args.max_new_tokens, args.ctx_size)
        if engine.synthetic_note:
            print(f"note: {engine.synthetic_note}", file=sys.stderr)
        with trace_to(args.profile_trace, args.profile_steps, engine.model):
            result = engine.generate(prompt, chat=chat, on_text=show,
                                     **generation_kwargs(args))
        print()
        print(result.stats.line(), file=sys.stderr)
        if args.stats_json is not None:
            payload = {**result.stats.as_dict(), "cache": engine.stats,
                       "budget_bytes": engine.config.budget_bytes()}
            args.stats_json.parent.mkdir(parents=True, exist_ok=True)
            args.stats_json.write_text(json.dumps(payload, indent=1))
    return 0
