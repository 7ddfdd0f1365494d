"""``offload-engine synth MODEL DST``: a quantized directory with real shapes and random weights."""

from __future__ import annotations

from pathlib import Path

from ..model.presets import PRESETS
from ..quant.schemes import DEFAULT_GROUP_SIZE, DEFAULT_SCHEME, GROUP_SIZES, SCHEMES
from ..units import parse_positive_bytes


def register(commands) -> None:
    parser = commands.add_parser(
        "synth", help="write a synthetic model (real shapes, random weights) to measure speed",
        description="Write a quantized directory with the shapes of MODEL and seeded random "
                    "weights, plus a small tokenizer, so `run`, `bench` and `plan` work on it "
                    "without downloading anything. Its speed and memory are real; its text is "
                    "noise. The manifest marks it synthetic.")
    parser.add_argument("model", help=f"a config.json, a directory with one, or a built-in "
                                      f"name: {', '.join(sorted(PRESETS))}")
    parser.add_argument("dst", type=Path, nargs="?", default=None,
                        help="output directory (omit with --dry-run)")
    parser.add_argument("--scheme", choices=SCHEMES, default=DEFAULT_SCHEME)
    parser.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=DEFAULT_GROUP_SIZE)
    parser.add_argument("--layers", type=int, default=None, metavar="N",
                        help="write only the first N decoder layers (tests, quick checks)")
    parser.add_argument("--vocab-size", type=int, default=None, metavar="V",
                        help="override the vocabulary size (tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=parse_positive_bytes, default="2GiB",
                        help="largest output shard (default 2GiB); RAM use stays near it")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the sizes and write nothing")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from ..checkpoint.synth import SynthRequest, synthesize
    from ..errors import ConfigError
    from ..quant.layout import QuantSpec

    if args.dst is None and not args.dry_run:
        raise ConfigError("synth: give DST, or --dry-run to print the sizes only")
    request = SynthRequest(args.model, QuantSpec(args.scheme, args.group_size),
                           layers=args.layers, vocab_size=args.vocab_size, seed=args.seed,
                           shard_bytes=args.shard_size)
    summary = synthesize(request, None if args.dry_run else args.dst, force=args.force,
                         progress=not args.no_progress)
    print("\n".join(summary.lines()))
    return 0
