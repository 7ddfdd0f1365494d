"""``offload-engine export DIR DST --format compressed-tensors``: our quantized directory
as a checkpoint vLLM and SGLang serve (the same weights, bit for bit)."""

from __future__ import annotations

from pathlib import Path

from ..units import parse_positive_bytes

FORMATS = ("compressed-tensors",)  # checkpoint/export.py's; kept here so --help stays light


def register(commands) -> None:
    parser = commands.add_parser(
        "export",
        help="write a quantized directory as a compressed-tensors checkpoint (vLLM/SGLang)",
        description="Repack the int4/int4-asym/int8 weights of a quantized directory DIR, "
        "without re-rounding, as a compressed-tensors pack-quantized checkpoint DST that "
        "vLLM and SGLang load natively. See docs/import.md.",
    )
    parser.add_argument("directory", type=Path, help="a directory written by `quantize`")
    parser.add_argument("dst", type=Path, help="output directory (must not exist or be empty, "
                                               "or be a previous export with --force)")
    parser.add_argument("--format", choices=FORMATS, default=FORMATS[0],
                        help="checkpoint format to write")
    parser.add_argument("--shard-size", type=parse_positive_bytes, default="2GiB",
                        help="largest output shard, e.g. 512MiB (default 2GiB)")
    parser.add_argument("--force", action="store_true",
                        help="replace DST when it is a previous output of `export` (nothing "
                             "else is ever replaced)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from ..checkpoint.export import export_compressed_tensors

    summary = export_compressed_tensors(args.directory, args.dst, shard_bytes=args.shard_size,
                                        progress=not args.no_progress, force=args.force)
    print("\n".join(summary.lines()))
    return 0
