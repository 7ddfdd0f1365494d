"""``offload-engine eval MODEL --reference SRC``: what quantization costs, measured.

With ``--kv-cache int8|k8v4|int4`` it also measures what the quantized KV cache costs against
the same engine's dense cache (no reference model needed for that part).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .options import add_engine_args, engine_config_from_args

DEFAULT_TOKENS = 2048
DEFAULT_GREEDY_TOKENS = 64
DEFAULT_WINDOW = 512
KV_DEFAULT_TOKENS = 4096  # --kv-cache: two windows of 2048, contexts up to 2048 tokens
KV_DEFAULT_WINDOW = 2048
# Beyond these the reference is almost surely another model. The model's own int4 stays
# well inside: SmolLM2-135M KL 0.25-0.61 nats, top-1 62-75% (docs/quality.md); the tiny
# random test model KL 0.9-1.2 nats, top-1 21-38%. Unrelated models: 5.6 nats and 0% (two
# tiny models of different seeds), 12.6 nats and 0% (the real case in issue 23)
UNRELATED_KL = 3.0  # nats per token
UNRELATED_TOP1 = 0.05


def register(commands) -> None:
    parser = commands.add_parser(
        "eval", help="compare a quantized model with its unquantized reference",
        description="Score the quantized model (through the engine) and the reference (with "
                    "transformers, float32 on CPU) on the same tokens: perplexity of both, "
                    "mean KL divergence, top-1 agreement and greedy tokens before divergence. "
                    "With --kv-cache int8|k8v4|int4, score the quantized KV cache against the "
                    "engine's dense cache (--reference is then optional).")
    parser.add_argument("model", type=Path, help="a directory written by `quantize`")
    parser.add_argument("--reference", type=Path, default=None, metavar="SRC",
                        help="the unquantized model: a Hugging Face safetensors directory or "
                             "a .gguf file (required unless --kv-cache is int8, k8v4 or int4)")
    parser.add_argument("--text", type=Path, default=None, metavar="FILE",
                        help="UTF-8 text to score (default: a fixed slice of CPython's "
                             "pydoc_data.topics)")
    parser.add_argument("--tokens", type=int, default=None, metavar="N",
                        help=f"score the first N tokens of the text (default {DEFAULT_TOKENS}; "
                             f"{KV_DEFAULT_TOKENS} for the KV cache)")
    parser.add_argument("--greedy-tokens", type=int, default=DEFAULT_GREEDY_TOKENS, metavar="N",
                        help="greedy tokens to generate when looking for the first divergence "
                             f"(default {DEFAULT_GREEDY_TOKENS})")
    parser.add_argument("--window", type=int, default=None, metavar="N",
                        help="tokens per scored window, capped at the model's context "
                             f"(default {DEFAULT_WINDOW}; {KV_DEFAULT_WINDOW} for the KV cache)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    add_engine_args(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    from ..decode.api import load
    from ..errors import ConfigError
    from ..quality.evaluate import (
        EvalSettings,
        evaluate,
        load_reference,
        read_text,
        reference_location,
    )

    kv_mode = args.kv_cache if args.kv_cache != "bf16" else None
    if args.reference is None and kv_mode is None:
        raise ConfigError("eval needs --reference SRC (the unquantized model), or --kv-cache "
                          "int8|k8v4|int4 to measure the KV cache against the dense one")
    # Settings first: a bad --tokens or --window fails before any slow loading.
    weight_settings = EvalSettings(tokens=args.tokens or DEFAULT_TOKENS,
                                   window=args.window or DEFAULT_WINDOW,
                                   greedy_tokens=args.greedy_tokens)
    kv_settings = EvalSettings(tokens=args.tokens or KV_DEFAULT_TOKENS,
                               window=args.window or KV_DEFAULT_WINDOW,
                               greedy_tokens=args.greedy_tokens)
    text = read_text(args.text)
    if args.reference is not None:
        reference_location(args.reference)
    config = engine_config_from_args(args)
    results = {}
    with load(args.model, config) as engine:
        if args.reference is not None:
            reference = load_reference(args.reference, config.progress)
            results["weights"] = evaluate(engine, reference, text, weight_settings,
                                          progress=config.progress)
            warn_if_unrelated(results["weights"])
        if kv_mode is not None:
            from ..quality.kv_eval import evaluate_kv_cache

            results["kv_cache"] = evaluate_kv_cache(engine, kv_mode, text, kv_settings,
                                                    progress=config.progress)
    if args.json:
        data = {name: report.as_dict() for name, report in results.items()}
        print(json.dumps(data if len(data) > 1 else next(iter(data.values())), indent=1))
    else:
        print("\n\n".join(report.render() for report in results.values()))
    return 0


def warn_if_unrelated(report) -> None:
    """Say so on stderr when the reference cannot be the model that was quantized."""
    if report.mean_kl > UNRELATED_KL or report.top1_agreement < UNRELATED_TOP1:
        print(f"warning: the reference disagrees with the quantized model far beyond what "
              f"quantization does (mean KL {report.mean_kl:.2f} nats, top-1 agreement "
              f"{report.top1_agreement:.0%}); is --reference {report.reference} the model "
              f"{report.model} was quantized from?", file=sys.stderr)
