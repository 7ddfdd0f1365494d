"""``offload-engine eval MODEL --reference SRC``: what quantization costs, measured."""

from __future__ import annotations

import json
from pathlib import Path

from .options import add_engine_args, engine_config_from_args

DEFAULT_TOKENS = 2048
DEFAULT_GREEDY_TOKENS = 64
DEFAULT_WINDOW = 512


def register(commands) -> None:
    parser = commands.add_parser(
        "eval", help="compare a quantized model with its unquantized reference",
        description="Score the quantized model (through the engine) and the reference (with "
                    "transformers, float32 on CPU) on the same tokens: perplexity of both, "
                    "mean KL divergence, top-1 agreement and greedy tokens before divergence.")
    parser.add_argument("model", type=Path, help="a directory written by `quantize`")
    parser.add_argument("--reference", type=Path, required=True, metavar="SRC",
                        help="the unquantized model: a Hugging Face safetensors directory or "
                             "a .gguf file")
    parser.add_argument("--text", type=Path, default=None, metavar="FILE",
                        help="UTF-8 text to score (default: a fixed slice of CPython's "
                             "pydoc_data.topics)")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, metavar="N",
                        help=f"score the first N tokens of the text (default {DEFAULT_TOKENS})")
    parser.add_argument("--greedy-tokens", type=int, default=DEFAULT_GREEDY_TOKENS, metavar="N",
                        help="greedy tokens to generate when looking for the first divergence "
                             f"(default {DEFAULT_GREEDY_TOKENS})")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW, metavar="N",
                        help="tokens per scored window, capped at the model's context "
                             f"(default {DEFAULT_WINDOW})")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    add_engine_args(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    from ..decode.api import load
    from ..quality.evaluate import (
        EvalSettings,
        evaluate,
        load_reference,
        read_text,
        reference_location,
    )

    settings = EvalSettings(tokens=args.tokens, window=args.window,
                            greedy_tokens=args.greedy_tokens)
    text = read_text(args.text)
    reference_location(args.reference)  # fail before any slow loading
    config = engine_config_from_args(args)
    with load(args.model, config) as engine:
        reference = load_reference(args.reference)
        report = evaluate(engine, reference, text, settings, progress=config.progress)
    if args.json:
        print(json.dumps(report.as_dict(), indent=1))
    else:
        print(report.render())
    return 0
