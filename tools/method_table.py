"""What each quantization method costs on the embedded SmolLM2, as one Markdown table.

    python tools/method_table.py [--only awq:int4-asym:128 ...] [--json-out FILE]

Converts the shipped SmolLM2-135M-Instruct GGUF with every method x scheme x group of
ROWS (`quantize --method ...` with its default settings; conversions are cached under
embedded.cache_root() with their measured conversion time beside them, and reused), then
runs `offload-engine eval`'s measurements for each against the GGUF itself (loaded once)
on eval's default text, which the awq/gptq calibration text never overlaps
(checkpoint/calibration_data.py). Rows print as they finish, then the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SPECS = (("int4-asym", 128), ("int4-asym", 64), ("int4", 128), ("int4", 64))
METHODS = ("rtn", "clip", "awq", "gptq", "awq-gptq")
CALIBRATED = ("awq", "gptq", "awq-gptq")  # methods with a layer-by-layer calibration pass


def parse_args(argv=None) -> argparse.Namespace:
    from offload_engine.cli.options import add_engine_args

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, metavar="N",
                        help="tokens of eval's default text to score (default 2048)")
    parser.add_argument("--only", action="append", default=None,
                        metavar="METHOD:SCHEME:GROUP",
                        help="run only these rows (repeatable), e.g. awq:int4-asym:128")
    parser.add_argument("--json-out", type=Path, default=None, metavar="FILE",
                        help="also write every row as JSON to FILE")
    add_engine_args(parser)
    return parser.parse_args(argv)


def selected_rows(only) -> list:
    from offload_engine.errors import ConfigError
    from offload_engine.quant.layout import QuantSpec

    if not only:
        return [(method, QuantSpec(s, g)) for s, g in SPECS for method in METHODS]
    rows = []
    for item in only:
        parts = item.split(":")
        if len(parts) != 3 or not parts[2].isdigit() or parts[0] not in METHODS:
            raise ConfigError(f"--only {item!r}: write it as METHOD:SCHEME:GROUP, "
                              "e.g. awq:int4-asym:128")
        rows.append((parts[0], QuantSpec(parts[1], int(parts[2]))))
    return rows


def converted(method: str, spec, progress: bool):
    """(directory, conversion seconds, calibration seconds per layer); cached."""
    from offload_engine.checkpoint.convert import convert
    from offload_engine.checkpoint.embedded import cache_root, embedded_gguf
    from offload_engine.checkpoint.methods import MethodSettings

    target = cache_root() / f"smollm2-135m-instruct-{spec.scheme}-g{spec.group_size}-{method}"
    timing = target.with_name(target.name + ".timing.json")
    if target.is_dir() and timing.is_file():
        saved = json.loads(timing.read_text())
        return target, saved["seconds"], saved["seconds_per_layer"]
    # requantize: the GGUF's Q4_1 linears would otherwise be imported exactly, and no
    # method would run at all (every row would read KL 0)
    summary = convert(embedded_gguf(), target, spec, force=True, progress=progress,
                      requantize=True, method=MethodSettings(method))
    per_layer = summary.calibration_seconds / max(summary.calibration_layers, 1)
    timing.write_text(json.dumps({"seconds": summary.seconds, "seconds_per_layer": per_layer}))
    print(f"converted {target.name} in {summary.seconds:.0f} s", file=sys.stderr)
    return target, summary.seconds, per_layer


def markdown_table(rows) -> str:
    header = ("| method | scheme | group | bytes/param | perplexity increase | mean KL (nats) "
              "| KL / rtn's | top-1 agreement | conversion (s) | calibration (s/layer) |")
    lines = [header, "|" + "---|" * 10]
    rtn_kl = {(r["scheme"], r["group_size"]): r["mean_kl"] for r in rows
              if r["method"] == "rtn"}
    for r in rows:
        base = rtn_kl.get((r["scheme"], r["group_size"]))
        ratio = f"{r['mean_kl'] / base:.2f}" if base else "-"
        per_layer = f"{r['seconds_per_layer']:.1f}" if r["method"] in CALIBRATED else "-"
        lines.append(
            f"| {r['method']} | {r['scheme']} | {r['group_size']} "
            f"| {r['linear_bytes_per_param']:.4f} | {r['perplexity_increase']:+.1%} "
            f"| {r['mean_kl']:.4f} | {ratio} | {r['top1_agreement']:.1%} "
            f"| {r['conversion_seconds']:.0f} | {per_layer} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from offload_engine.checkpoint.embedded import embedded_gguf
    from offload_engine.cli.options import engine_config_from_args
    from offload_engine.decode.api import load
    from offload_engine.errors import OffloadError
    from offload_engine.quality.evaluate import EvalSettings, evaluate, load_reference

    args = parse_args(argv)
    rows = []
    try:
        config = engine_config_from_args(args)
        settings = EvalSettings(tokens=args.tokens)
        reference = load_reference(embedded_gguf())  # once, shared by every row
        for method, spec in selected_rows(args.only):
            directory, seconds, per_layer = converted(method, spec, config.progress)
            with load(directory, config) as engine:
                report = evaluate(engine, reference, None, settings, config.progress)
            rows.append(dict(report.as_dict(), method=method, conversion_seconds=seconds,
                             seconds_per_layer=per_layer))
            print(f"{method} {spec.scheme} g{spec.group_size}: KL {report.mean_kl:.4f}",
                  file=sys.stderr)
            if args.json_out is not None:  # after every row: a long run keeps what it did
                args.json_out.write_text(json.dumps(rows, indent=1))
    except OffloadError as exc:
        print(f"method_table: error: {exc}", file=sys.stderr)
        return 2
    print(f"SmolLM2-135M-Instruct vs its GGUF, {rows[0]['tokens']} tokens of eval's default "
          f"text, {rows[0]['device']}, {time.strftime('%Y-%m-%d')}\n")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
