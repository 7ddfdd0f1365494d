"""Offline step: write one of our quantized directories as a compressed-tensors
``pack-quantized`` checkpoint, the W4A16 (or W8A16) format vLLM and SGLang load natively.

Nothing is re-rounded: codes, scales and zero points are repacked bit for bit
(:mod:`offload_engine.quant.ct_pack`). Two things are not the same bytes:

- a quantized ``lm_head`` is written dense, dequantized in the scale dtype, and listed
  in ``ignore``, as llm-compressor's W4A16 recipes write it: vLLM's LM head is a
  vocab-parallel embedding, not a Linear its WNA16 scheme replaces. Its values are the
  ones compressed-tensors' own decompression gives (the product rounded once to the scale
  dtype).
- config.json's dtype is set to the scale dtype, because vLLM loads the scales in the
  model dtype: with ``dtype: auto`` fp16 scales stay fp16 (and bf16 stay bf16).
- a model whose ``lm_head`` is tied to the embeddings stores no ``lm_head``: it is listed
  in ``ignore`` too, or transformers would make it a quantized Linear expecting packed
  weights the checkpoint cannot have, and the tie would fail.

Asymmetric (int4-asym) exports hold packed zero points as compressed-tensors' own
compressor writes them and vLLM reads them; transformers 5.24 with compressed-tensors
0.20.1 cannot load any such checkpoint (its meta-device compression leaves the model's
zero points unpacked, so their shapes differ from every file's), ours included.

Like ``quantize``, the output is staged beside DST and renamed into place at the end.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import List

from tqdm.auto import tqdm

from ..errors import ConversionError
from ..model.architecture import ties_embeddings
from ..quant import ct_pack
from ..quant.quantize import QuantizedWeight, dequantize_weight
from ..units import format_bytes
from .convert import DEFAULT_SHARD_BYTES, ShardWriter
from .destination import check_replaceable, staged_output
from .format import MANIFEST_NAME, Manifest, load_component, verify_directory
from .hfconfig import read_hf_config
from .sources import SIDE_FILES

logger = logging.getLogger(__name__)
FORMATS = ("compressed-tensors",)  # what `export --format` offers
TORCH_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16"}
INDEX_NAME = "model.safetensors.index.json"
MARLIN_GROUP_SIZES = (32, 64, 128)  # vLLM marlin_utils.MARLIN_SUPPORTED_GROUP_SIZES (and -1)


@dataclass
class ExportSummary:
    """What an export did, for the closing report."""

    destination: Path
    quantized: int  # linears written pack-quantized
    dense: int  # tensors written as they are (lm_head dequantized among them)
    nbytes: int

    def lines(self) -> list:
        return [f"wrote {self.destination} (compressed-tensors pack-quantized)",
                f"  tensors: {self.quantized} pack-quantized, {self.dense} dense",
                f"  bytes: {format_bytes(self.nbytes)}"]


def quantization_config(manifest: Manifest, ignore: list) -> dict:
    """config.json's ``quantization_config`` for our spec (compressed-tensors schema)."""
    spec = manifest.spec
    weights = {"num_bits": spec.bits, "type": "int", "symmetric": not spec.has_zeros,
               "group_size": spec.group_size, "strategy": "group", "dynamic": False,
               "actorder": None, "block_structure": None, "observer": "minmax",
               "observer_kwargs": {}}
    group = {"targets": ["Linear"], "weights": weights, "input_activations": None,
             "output_activations": None, "format": "pack-quantized"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed", "config_groups": {"group_0": group},
            "ignore": ignore, "kv_cache_scheme": None, "sparsity_config": {},
            "transform_config": {}, "global_compression_ratio": None}


def check_exportable(manifest: Manifest, where: Path) -> None:
    """Refuse, before any work, what compressed-tensors cannot express."""
    _check_one_exportable_spec(manifest, where)
    spec = manifest.spec
    if spec.scheme not in ct_pack.EXPORT_SCHEMES:
        raise ConversionError(
            f"{where}: scheme {spec.scheme} (a float minimum per group, from a GGUF Q4_1 "
            "import) has no compressed-tensors form: its zero points are integers. Quantize "
            "the original with `offload-engine quantize --scheme int4-asym` and export that")
    if spec.group_size not in MARLIN_GROUP_SIZES:
        logger.warning("%s: group size %d is valid compressed-tensors, but vLLM's Marlin "
                       "kernels take groups of %s; vLLM may pick a slower kernel or refuse it",
                       where, spec.group_size, ", ".join(map(str, MARLIN_GROUP_SIZES)))
    for name, entry in manifest.tensors.items():
        if entry.quantized and entry.shape[1] % spec.group_size:
            raise ConversionError(
                f"{where}: {name} has {entry.shape[1]} inputs, not a multiple of the group "
                f"size {spec.group_size}; compressed-tensors and vLLM need whole groups. "
                "Quantize with a --group-size that divides every input size")


def export_foreign_entries(directory: Path) -> List[str]:
    """Names in DIRECTORY that an export did not write (all of them when it is no export:
    no index, or a config.json without a compressed-tensors quantization_config)."""
    names = sorted(entry.name for entry in directory.iterdir())
    try:
        shards = set(json.loads((directory / INDEX_NAME).read_text())["weight_map"].values())
        config = json.loads((directory / "config.json").read_text())
        ours = config["quantization_config"]["quant_method"] == "compressed-tensors"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return names
    if not ours:
        return names
    known = shards | {INDEX_NAME, "chat_template.jinja"} | set(SIDE_FILES)
    return [name for name in names if name not in known or (directory / name).is_dir()]


def _check_one_exportable_spec(manifest: Manifest, where: Path) -> None:
    """Refuse GGUF raw blocks (K-quants, Q5_0/Q5_1) and directories mixing specs: a
    compressed-tensors group config holds integer codes of one bit width with a scale (and
    zero point) per group, and one config covers every Linear here."""
    for name, entry in manifest.tensors.items():
        if not entry.quantized:
            continue
        spec = manifest.spec_of(entry)
        if spec.raw_blocks:
            fmt = spec.block_format
            why = ("4-bit e2m1 float codes, not integers" if fmt.e8m0_fields else
                   f"{fmt.bits}-bit codes under sub-block scales that are no fp16")
            raise ConversionError(
                f"{where}: {name} holds GGUF {fmt.ggml_type} blocks (imported exactly as the "
                f"source stored them), which have no compressed-tensors form: {why}. "
                "Export refuses rather than re-round them; quantize the original float "
                "model with `offload-engine quantize --scheme int4-asym` and export that")
        if spec != manifest.spec:
            raise ConversionError(
                f"{where}: {name} is stored as {spec.scheme} g{spec.group_size}, other "
                f"tensors as {manifest.spec.scheme} g{manifest.spec.group_size}; export "
                "writes one scheme for every Linear. Quantize the original float model with "
                "one --scheme and export that")


def export_compressed_tensors(src, dst, shard_bytes: int = DEFAULT_SHARD_BYTES,
                              progress: bool = True, force: bool = False) -> ExportSummary:
    """Write the quantized directory SRC as a compressed-tensors checkpoint DST; ``force``
    replaces a previous export there (nothing else)."""
    src, dst = Path(src), Path(dst)
    manifest = verify_directory(src)
    check_exportable(manifest, src)
    if dst.resolve() == src.resolve() or dst.resolve().is_relative_to(src.resolve()):
        raise ConversionError(f"{dst}: write the export beside {src}, not into it")
    check_replaceable(dst, force, "export", export_foreign_entries)
    with staged_output(dst, f"exporting {src}") as tmp:
        summary = _write(manifest, src, tmp, shard_bytes, progress)
    summary.destination = dst
    return summary


def _write(manifest: Manifest, src: Path, tmp: Path, shard_bytes: int,
           progress: bool) -> ExportSummary:
    writer = ShardWriter(tmp, shard_bytes)
    weight_map, headers, ignore = {}, {}, []
    quantized = dense = 0
    scale_dtype = manifest.spec.scale_torch_dtype
    for name, entry in tqdm(manifest.tensors.items(), desc="exporting", unit="tensor",
                            disable=not progress):
        parts = {key: load_component(src, comp, headers)
                 for key, comp in entry.components.items()}
        if not entry.quantized:
            tensors, dense = {name: parts["dense"]}, dense + 1
        else:
            weight = QuantizedWeight.from_parts(parts, manifest.spec, *entry.shape)
            module = name[:-len(".weight")]
            if entry.role == "lm_head":
                ignore.append(module)
                tensors, dense = {name: dequantize_weight(weight).to(scale_dtype)}, dense + 1
            else:
                tensors = {f"{module}.{part}": value for part, value in
                           ct_pack.export_weight(weight, name).items()}
                quantized += 1
        for key, value in tensors.items():
            weight_map[key] = writer.add(key, value).shard
    writer.flush()
    if ties_embeddings(read_hf_config(src)) and "lm_head" not in ignore:
        ignore.append("lm_head")  # tied: stored as the embedding, never quantized
    (tmp / INDEX_NAME).write_text(json.dumps(
        {"metadata": {"total_size": sum(writer.shards.values())}, "weight_map": weight_map},
        indent=2, sort_keys=True))
    _write_side_files(src, tmp, manifest, ignore)
    return ExportSummary(tmp, quantized, dense, sum(writer.shards.values()))


def _write_side_files(src: Path, tmp: Path, manifest: Manifest, ignore: list) -> None:
    """Tokenizer and generation files as they are; config.json with the quantization."""
    for path in src.iterdir():
        if path.is_file() and path.name not in manifest.shards and path.name not in (
                MANIFEST_NAME, "config.json"):
            shutil.copy2(path, tmp / path.name)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config(manifest, ignore)
    dtype = TORCH_DTYPE_NAMES[manifest.spec.scale_dtype]
    if config.get("torch_dtype", config.get("dtype")) not in (None, dtype):
        logger.warning("config.json dtype set to %s (was %s) so that vLLM keeps the %s "
                       "scales exactly", dtype, config.get("torch_dtype", config.get("dtype")),
                       manifest.spec.scale_dtype)
    config["torch_dtype"] = config["dtype"] = dtype
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
