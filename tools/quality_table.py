"""What each quantization scheme costs on the embedded SmolLM2, as one Markdown table.

    python tools/quality_table.py [--tokens N] [--only int4:64 --only int8:128]

Converts the shipped SmolLM2-135M-Instruct GGUF into every scheme and group size of
CONFIGS (conversions are cached under embedded.cache_root() and reused), then runs
`offload-engine eval`'s measurements for each against the GGUF itself (dequantized to
float32 by transformers, loaded once) and prints the table. Expect about 40 s per new
conversion and about a minute per evaluation of 2048 tokens on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# (scheme, group size) rows of the table, in order.
CONFIGS = (
    ("int4", 32), ("int4", 64), ("int4", 128),
    ("int4-asym", 32), ("int4-asym", 64), ("int4-asym", 128),
    ("int8", 128),
)


def parse_args(argv=None) -> argparse.Namespace:
    from offload_engine.cli.options import add_engine_args

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, metavar="N",
                        help="tokens of the default text to score (default 2048)")
    parser.add_argument("--window", type=int, default=512, metavar="N",
                        help="tokens per scored window (default 512)")
    parser.add_argument("--greedy-tokens", type=int, default=64, metavar="N",
                        help="greedy tokens compared from the fixed prompt (default 64)")
    parser.add_argument("--only", action="append", default=None, metavar="SCHEME:GROUP",
                        help="run only these rows (repeatable), e.g. --only int4-asym:64")
    parser.add_argument("--json-out", type=Path, default=None, metavar="FILE",
                        help="also write every report as JSON to FILE")
    add_engine_args(parser)
    return parser.parse_args(argv)


def selected_configs(only) -> list:
    from offload_engine.errors import ConfigError
    from offload_engine.quant.layout import QuantSpec

    if not only:
        return [QuantSpec(scheme, group) for scheme, group in CONFIGS]
    specs = []
    for item in only:
        scheme, _, group = item.partition(":")
        if not group.isdigit():
            raise ConfigError(f"--only {item!r}: write it as SCHEME:GROUP, e.g. int4:128")
        specs.append(QuantSpec(scheme, int(group)))
    return specs


def converted(spec, progress: bool) -> Path:
    """The cached conversion of the embedded GGUF for ``spec``; converted now if needed."""
    from offload_engine.checkpoint.embedded import ensure_demo_model

    target, summary = ensure_demo_model(spec, progress=progress)
    if summary is not None:
        print(f"converted to {spec.scheme} g{spec.group_size} -> {target}", file=sys.stderr)
    return target


def markdown_table(reports) -> str:
    header = ("| scheme | group | bytes/param | perplexity | reference perplexity "
              "| perplexity increase | mean KL (nats) | top-1 agreement "
              "| greedy tokens before divergence |")
    lines = [header, "|" + "---|" * 9]
    for r in reports:
        greedy = (f"{r.greedy_matching} (all)" if r.greedy_matching == r.greedy_tokens
                  else str(r.greedy_matching))
        lines.append(
            f"| {r.scheme} | {r.group_size} | {r.linear_bytes_per_param:.4f} "
            f"| {r.perplexity:.3f} | {r.reference_perplexity:.3f} "
            f"| {r.perplexity_increase:+.1%} | {r.mean_kl:.4f} | {r.top1_agreement:.1%} "
            f"| {greedy} of {r.greedy_tokens} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from offload_engine.checkpoint.embedded import embedded_gguf
    from offload_engine.cli.options import engine_config_from_args
    from offload_engine.decode.api import load
    from offload_engine.errors import OffloadError
    from offload_engine.quality.evaluate import EvalSettings, evaluate, load_reference

    args = parse_args(argv)
    try:
        config = engine_config_from_args(args)
        settings = EvalSettings(tokens=args.tokens, window=args.window,
                                greedy_tokens=args.greedy_tokens)
        specs = selected_configs(args.only)
        gguf = embedded_gguf()
        directories = [converted(spec, config.progress) for spec in specs]
        reference = load_reference(gguf)  # once, shared by every row
        reports = []
        for directory in directories:
            with load(directory, config) as engine:
                reports.append(evaluate(engine, reference, None, settings, config.progress))
            print(f"{directory.name}: {reports[-1].seconds:.0f} s", file=sys.stderr)
    except OffloadError as exc:
        print(f"quality_table: error: {exc}", file=sys.stderr)
        return 2
    print(f"SmolLM2-135M-Instruct vs its GGUF ({gguf.name}), {reports[0].tokens} tokens of "
          f"pydoc_data.topics, {reports[0].device}, {time.strftime('%Y-%m-%d')}\n")
    print(markdown_table(reports))
    if args.json_out is not None:
        args.json_out.write_text(json.dumps([r.as_dict() for r in reports], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
