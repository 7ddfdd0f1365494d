"""Describe the model at a path for the planner: a quantized directory or an HF config.

A quantized directory brings its own scheme and the stored size of its dense tensors
(from the manifest); a bare Hugging Face directory or config.json is planned for the
scheme asked for.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Optional, Union

from ..checkpoint import stfile
from ..checkpoint.format import MANIFEST_NAME, QUANTIZED_ROLES, read_manifest
from ..checkpoint.hfconfig import read_config_file
from ..errors import ConfigError, FormatError, SourceError
from ..model.model_shape import ModelShape, shape_from_config
from ..model.presets import is_preset
from ..quant.layout import QuantSpec
from .overhead import attach_decode_ops


def describe_model(path: Union[str, Path], spec: Optional[QuantSpec] = None) -> ModelShape:
    """Shapes of the model at ``path``: a quantized directory, an HF directory or config.json,
    or a built-in name (``qwen2.5-32b``, model/presets.py).

    ``spec`` is the scheme to plan for; a quantized directory has its own, and asking
    for another one is an error.
    """
    path = Path(path)
    if is_preset(str(path)):  # as `synth` takes them
        from ..checkpoint.synth import resolve_config

        hf_config, label = resolve_config(str(path))
        return attach_decode_ops(shape_from_config(hf_config, spec or QuantSpec(), label),
                                 hf_config)
    hf_config, manifest = _read_config(path)
    if manifest is None:
        shape = shape_from_config(hf_config, spec or QuantSpec(), str(path))
        if path.is_dir():
            _check_layers(path, shape.num_layers, _source_keys(path))
        return attach_decode_ops(shape, hf_config)
    if spec is not None and spec != manifest.spec:
        raise ConfigError(
            f"{path} is quantized as {manifest.scheme} g{manifest.group_size}; plan it "
            f"without --scheme/--group-size, or plan the source config.json for "
            f"{spec.scheme} g{spec.group_size}")
    roles = manifest.bytes_by_role()
    host_dense = sum(b for role, b in roles.items() if role not in QUANTIZED_ROLES)
    shape = shape_from_config(hf_config, manifest.spec, str(path), quantized=True,
                              host_dense_bytes=host_dense)
    if manifest.mixed:  # each linear as stored (a GGUF Q4_K_M import mixes block types)
        entries = manifest.tensors
        shape.linears = [replace(lin, spec=manifest.spec_of(entries[f"{lin.name}.weight"]))
                         if f"{lin.name}.weight" in entries else lin for lin in shape.linears]
    _check_layers(path, shape.num_layers, manifest.tensors)
    return attach_decode_ops(shape, hf_config)


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _source_keys(directory: Path) -> list:
    """Tensor names in a source directory's safetensors shards (headers only)."""
    return [key for shard in sorted(directory.glob("*.safetensors"))
            for key in stfile.read_header(shard)]


def _check_layers(path: Path, config_layers: int, names: Iterable[str]) -> None:
    """Refuse a config with more decoder layers than the shards hold (a config.json from
    another model, or shards missing): planning it would plan weights that do not exist.
    A config.json alone (no shards yet) is planned as it is."""
    stored = {int(match.group(1)) for name in names if (match := _LAYER.search(name))}
    if stored and len(stored) < config_layers:
        raise FormatError(
            f"{path}: config.json says {config_layers} layers, but the shards hold "
            f"{len(stored)} (layers {min(stored)}..{max(stored)}); the checkpoint is incomplete "
            "or config.json belongs to another model: download the missing shards or fix "
            "num_hidden_layers")


def _read_config(path: Path):
    """(transformers config, manifest or None) for a directory or a config.json file."""
    if path.suffix == ".gguf":
        raise ConfigError(f"{path}: plan reads config.json, not GGUF; convert it first with "
                          "`offload-engine quantize`, or plan the original model's config.json")
    if path.is_file():
        config_path, manifest = path, None
    elif path.is_dir():
        config_path = path / "config.json"
        manifest = read_manifest(path) if (path / MANIFEST_NAME).is_file() else None
    else:
        raise SourceError(f"{path}: no such file or directory; give a quantized directory, a "
                          "Hugging Face model directory or its config.json")
    if not config_path.is_file():
        raise SourceError(f"{path}: no config.json; give a Hugging Face model directory or "
                          "the path of its config.json")
    return read_config_file(config_path, SourceError, "fix it or download it again"), manifest


