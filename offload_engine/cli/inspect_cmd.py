"""``offload-engine inspect DIR``: summarise a quantized directory and verify its shards."""

from __future__ import annotations

from pathlib import Path

from ..units import format_bytes


def register(commands) -> None:
    parser = commands.add_parser(
        "inspect",
        help="summarise a quantized directory and verify every shard",
        description="Print the manifest summary and check every shard and tensor against "
        "it, and everything `run` checks before loading (config, tokenizer files, the "
        "manifest's linears against the model's, NaN or Inf in float tensors); exits "
        "non-zero naming the bad file or tensor.",
    )
    parser.add_argument("directory", type=Path, help="a directory written by `quantize`")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from tqdm.auto import tqdm

    from ..checkpoint.checksums import verify_shards
    from ..checkpoint.format import verify_directory
    from ..checkpoint.synth import synthetic_note
    from ..runtime.engine import check_loadable

    manifest = verify_directory(args.directory)
    with tqdm(total=len(manifest.shards), desc="checksums", unit="shard",
              disable=args.no_progress) as bar:
        checked = verify_shards(args.directory, manifest, progress=lambda shard: bar.update())
    check_loadable(args.directory, manifest)
    source = manifest.source
    print(f"{args.directory}: {manifest.format} v{manifest.format_version} "
          f"({manifest.created_by})")
    print(f"  source: {source.get('kind')} {source.get('model_type')} {source.get('path')}")
    print(f"  scheme: {manifest.scheme}, group size {manifest.group_size}, "
          f"{manifest.scale_dtype} scales"
          + (f" (imported exactly from {source.get('format')})" if source.get("exact") else "")
          + (f" (imported from {source.get('format')}; quantized here, from float: "
             f"{', '.join(source['requantized'])})" if source.get("requantized") else ""))
    print(f"  method: {_method(source)}")
    if manifest.mixed:  # per-tensor specs (a GGUF Q4_K_M import): parameters by spec
        specs = manifest.specs()
        total = sum(specs.values())
        print("  per-tensor schemes: " + ", ".join(
            f"{spec.scheme} g{spec.group_size} {100 * count / total:.1f}%"
            for spec, count in sorted(specs.items(), key=lambda kv: -kv[1])))
    quantized = sum(entry.quantized for entry in manifest.tensors.values())
    print(f"  tensors: {len(manifest.tensors)} ({quantized} quantized) "
          f"in {len(manifest.shards)} shard(s), {format_bytes(sum(manifest.shards.values()))}")
    for role, nbytes in sorted(manifest.bytes_by_role().items()):
        print(f"    {role:<10} {format_bytes(nbytes):>12}")
    if checked:
        print("  verified: every shard and tensor matches the manifest, checksums included")
    else:
        print("  verified: shapes and sizes only (this manifest has no checksums; "
              "re-convert the model to add them)")
    print("  loadable: config, tokenizer files, linears and finite values, as `run` checks")
    if synthetic_note(manifest):
        print(f"  {synthetic_note(manifest)}")
    return 0


def _method(source: dict) -> str:
    """How the codes were chosen: the quantization method and its calibration, or the
    format imported exactly (nothing rounded here)."""
    method = source.get("quantization_method")
    if not method:
        if source.get("requantized"):
            return (f"codes imported from {source.get('format')}; "
                    f"{len(source['requantized'])} linear(s) rounded to nearest here")
        if source.get("exact"):
            return f"none here: codes imported from {source.get('format')}"
        return "not recorded (converted before methods were recorded)"
    text = method.get("name", "?")
    if "calibration_samples" in method:
        text += (f", calibrated on {method['calibration_samples']} x "
                 f"{method['calibration_seq_len']} tokens of {method.get('calibration_text')}")
    return text
