"""Describe the model at a path for the planner: a quantized directory or an HF config.

A quantized directory brings its own scheme and the stored size of its dense tensors
(from the manifest); a bare Hugging Face directory or config.json is planned for the
scheme asked for.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional, Union

from ..checkpoint.format import MANIFEST_NAME, read_manifest
from ..checkpoint.hfconfig import read_config_file
from ..errors import ConfigError, SourceError
from ..model.model_shape import ModelShape, shape_from_config
from ..quant.layout import QuantSpec
from .overhead import attach_decode_ops


def describe_model(path: Union[str, Path], spec: Optional[QuantSpec] = None) -> ModelShape:
    """Shapes of the model at ``path``: a quantized directory, an HF directory or config.json.

    ``spec`` is the scheme to plan for; a quantized directory has its own, and asking
    for another one is an error.
    """
    path = Path(path)
    hf_config, manifest = _read_config(path)
    if manifest is None:
        shape = shape_from_config(hf_config, spec or QuantSpec(), str(path))
        return attach_decode_ops(shape, hf_config)
    if spec is not None and spec != manifest.spec:
        raise ConfigError(
            f"{path} is quantized as {manifest.scheme} g{manifest.group_size}; plan it "
            f"without --scheme/--group-size, or plan the source config.json for "
            f"{spec.scheme} g{spec.group_size}")
    roles = manifest.bytes_by_role()
    host_dense = sum(b for role, b in roles.items() if role not in ("linear", "lm_head"))
    shape = shape_from_config(hf_config, manifest.spec, str(path), quantized=True,
                              host_dense_bytes=host_dense)
    if manifest.mixed:  # each linear as stored (a GGUF Q4_K_M import mixes block types)
        entries = manifest.tensors
        shape.linears = [replace(lin, spec=manifest.spec_of(entries[f"{lin.name}.weight"]))
                         if f"{lin.name}.weight" in entries else lin for lin in shape.linears]
    return attach_decode_ops(shape, hf_config)


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


