"""``offload-engine quantize SRC DST``: convert a checkpoint to our INT4 format."""

from __future__ import annotations

from pathlib import Path

from ..quant.schemes import DEFAULT_GROUP_SIZE, DEFAULT_SCHEME, GROUP_SIZES, SCHEMES
from ..units import parse_positive_bytes
from .method_options import add_method_args, method_from_args
from .options import note


def register(commands) -> None:
    parser = commands.add_parser(
        "quantize",
        help="convert a Hugging Face safetensors directory or a .gguf file",
        description="Quantize every linear weight of SRC group-wise and write the "
        "quantized directory DST (manifest + safetensors shards + config/tokenizer).",
    )
    parser.add_argument("src", help="HF model directory (safetensors), .gguf file, Hugging "
                                    "Face id in the local HF cache (ORG/NAME), or HF cache "
                                    "folder (models--ORG--NAME)")
    parser.add_argument("dst", type=Path, help="output directory (must not exist, see --force)")
    parser.add_argument("--scheme", choices=SCHEMES, default=DEFAULT_SCHEME,
                        help="int4-asym (zero point, default), int4 (symmetric) or int8; "
                             "see docs/quality.md")
    parser.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=DEFAULT_GROUP_SIZE,
                        help=f"elements per scale along the input dimension "
                             f"(default {DEFAULT_GROUP_SIZE})")
    parser.add_argument("--shard-size", type=parse_positive_bytes, default="2GiB",
                        help="largest output shard, e.g. 512MiB (default 2GiB)")
    parser.add_argument("--requantize", action="store_true",
                        help="a GGUF or gpt-oss MXFP4 source: dequantize it and quantize "
                             "again with --scheme and --group-size (lossy; without it, the "
                             "types our layout holds are imported exactly, ignoring --scheme)")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_method_args(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    from ..checkpoint.convert import convert
    from ..checkpoint.model_ref import resolve_model_path
    from ..quant.layout import QuantSpec

    summary = convert(resolve_model_path(args.src), args.dst,
                      QuantSpec(args.scheme, args.group_size),
                      force=args.force, shard_bytes=args.shard_size,
                      progress=not args.no_progress, requantize=args.requantize,
                      method=method_from_args(args), notify=note)
    print("\n".join(summary.lines()))
    return 0
