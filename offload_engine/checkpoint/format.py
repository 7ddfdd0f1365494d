"""The quantized checkpoint directory: a JSON manifest plus safetensors shards.

Layout of a directory::

    offload_manifest.json     format name/version, scheme, group size, source, tensors
    model-00001-of-0000N.safetensors ...
    config.json, generation_config.json, tokenizer files (copied from the source)

Every logical tensor has a role and one or more stored components:
``linear`` and ``lm_head`` tensors are quantized (components ``qweight``,
``scales`` and maybe ``zeros``, see :mod:`offload_engine.quant.layout`); every other
role (``embedding``, ``norm``, ``bias``, ``other``) is one dense component.

The manifest's scheme, group size and scale dtype apply to every quantized tensor unless
its entry names its own (``quant``): a GGUF import keeps each tensor's block type, so one
directory can mix Q4_K, Q6_K and Q5_0 tensors as a Q4_K_M file does. Such a manifest is
format version 2; one without per-tensor specs is still written as version 1.
Nothing is pickled: weights are safetensors, metadata is JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Optional

import torch

from ..errors import FormatError
from ..quant.layout import QuantSpec
from . import stfile

FORMAT_NAME = "offload-engine-quantized"
FORMAT_VERSION = 1  # what a directory with one spec for every tensor is written as
MIXED_FORMAT_VERSION = 2  # written when some tensor has its own spec (TensorEntry.quant)
READABLE_VERSIONS = (FORMAT_VERSION, MIXED_FORMAT_VERSION)
MANIFEST_NAME = "offload_manifest.json"
QUANTIZED_ROLES = ("linear", "lm_head", "expert")  # expert: one expert's matrix
DENSE_ROLES = ("embedding", "norm", "bias", "other")


@dataclass
class Component:
    """One stored tensor: where it lives and what it must look like."""

    shard: str  # file name inside the directory
    key: str  # key inside the shard
    shape: list
    dtype: str  # safetensors spelling, e.g. "U8", "BF16"


@dataclass
class TensorEntry:
    """One logical tensor of the model (e.g. ``model.layers.0.mlp.up_proj.weight``)."""

    role: str  # one of QUANTIZED_ROLES + DENSE_ROLES
    shape: list  # logical shape, e.g. [out_features, in_features]
    source_dtype: str  # dtype in the source checkpoint, safetensors spelling
    components: Dict[str, Component] = field(default_factory=dict)
    # {"scheme", "group_size", "scale_dtype"} when this tensor's spec is not the manifest's
    quant: Optional[dict] = None

    @property
    def quantized(self) -> bool:
        return self.role in QUANTIZED_ROLES

    @property
    def nbytes(self) -> int:
        total = 0
        for comp in self.components.values():
            numel = 1
            for dim in comp.shape:
                numel *= dim
            total += numel * stfile.DTYPES[comp.dtype].itemsize
        return total


@dataclass
class Manifest:
    """Everything a loader needs to know about a quantized directory."""

    scheme: str
    group_size: int
    source: dict  # {"kind": "safetensors"|"gguf", "path": ..., "model_type": ...}
    tensors: Dict[str, TensorEntry] = field(default_factory=dict)
    shards: Dict[str, int] = field(default_factory=dict)  # file name -> size in bytes
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    created_by: str = ""
    scale_dtype: str = "bf16"  # "fp16" for imported checkpoints; absent in older manifests
    # {"shards": {file: sha256}, "tensors": {file: {key: crc32}}, ...}; see checksums.py.
    # Empty in manifests written before checksums existed.
    checksums: dict = field(default_factory=dict)

    @property
    def spec(self) -> QuantSpec:
        """The directory's spec: every quantized tensor's unless its entry has its own."""
        return QuantSpec(self.scheme, self.group_size, self.scale_dtype)

    def spec_of(self, entry: TensorEntry) -> QuantSpec:
        """The spec one quantized tensor is stored with."""
        return self.spec if entry.quant is None else spec_from_dict(entry.quant)

    def specs(self) -> Dict[QuantSpec, int]:
        """Every spec of the quantized tensors -> parameters stored with it."""
        counts: Dict[QuantSpec, int] = {}
        for entry in self.tensors.values():
            if entry.quantized:
                spec = self.spec_of(entry)
                counts[spec] = counts.get(spec, 0) + entry.shape[0] * entry.shape[1]
        return counts

    @property
    def mixed(self) -> bool:
        return any(e.quant is not None for e in self.tensors.values())

    def bytes_by_role(self) -> Dict[str, int]:
        totals: Dict[str, int] = {}
        for entry in self.tensors.values():
            totals[entry.role] = totals.get(entry.role, 0) + entry.nbytes
        return totals

    def to_json(self) -> str:
        data = asdict(self)
        data["format_version"] = MIXED_FORMAT_VERSION if self.mixed else self.format_version
        for entry in data["tensors"].values():
            if entry["quant"] is None:
                del entry["quant"]
        return json.dumps(data, indent=1)


def spec_dict(spec: QuantSpec) -> dict:
    """A TensorEntry's ``quant``: what names a spec in the manifest."""
    return {"scheme": spec.scheme, "group_size": spec.group_size,
            "scale_dtype": spec.scale_dtype}


def spec_from_dict(data: dict) -> QuantSpec:
    return QuantSpec(data["scheme"], int(data["group_size"]), data["scale_dtype"])


def manifest_from_dict(data: dict, where: Path) -> Manifest:
    """Build a Manifest from parsed JSON, checking the format name and version first."""
    if data.get("format") != FORMAT_NAME:
        raise FormatError(
            f"{where}: not an offload-engine quantized manifest (format={data.get('format')!r}); "
            "convert the model with `offload-engine quantize SRC DST`"
        )
    version = data.get("format_version")
    if version not in READABLE_VERSIONS:
        raise FormatError(
            f"{where}: format version {version} is not supported by this release (it reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))}); re-convert the model with "
            "this release's `offload-engine quantize`, or install the release that wrote it"
        )
    try:
        tensors = {
            name: TensorEntry(
                role=entry["role"],
                shape=list(entry["shape"]),
                source_dtype=entry["source_dtype"],
                components={k: Component(**c) for k, c in entry["components"].items()},
                quant=None if entry.get("quant") is None else dict(entry["quant"]),
            )
            for name, entry in data["tensors"].items()
        }
        manifest = Manifest(
            scheme=data["scheme"],
            group_size=int(data["group_size"]),
            source=dict(data["source"]),
            tensors=tensors,
            shards={k: int(v) for k, v in data["shards"].items()},
            created_by=data.get("created_by", ""),
            scale_dtype=data.get("scale_dtype", "bf16"),
            checksums=dict(data.get("checksums") or {}),
            format_version=version,
        )
        QuantSpec(manifest.scheme, manifest.group_size, manifest.scale_dtype)  # raises if unknown
        for entry in tensors.values():
            if entry.quant is not None:
                spec_from_dict(entry.quant)
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"{where}: malformed manifest ({exc!r}); re-convert the model") from exc
    return manifest


def read_manifest(directory: Path) -> Manifest:
    """Read and sanity-check ``offload_manifest.json`` of a quantized directory."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise FormatError(not_a_quantized_dir(directory))
    if not path.is_file():
        raise FormatError(
            f"{directory}: no {MANIFEST_NAME}; this is not a quantized model directory "
            f"(create one with `offload-engine quantize {directory} {_suggested(directory)}`)"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: corrupt JSON ({exc}); re-convert the model") from exc
    return manifest_from_dict(data, path)


def not_a_quantized_dir(path: Path) -> str:
    """The message for a path that is no directory: a GGUF or other file must be converted."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        return (f"{path} is a GGUF file: `run`, `chat` and `serve` take it as it is (converted "
                "once into the engine's cache), or convert it with `offload-engine quantize "
                f"{path} DIR` and pass DIR")
    if path.is_file():
        return (f"{path} is a file, not a quantized directory; convert the model with "
                f"`offload-engine quantize SRC DST` and pass DST")
    return f"{path}: no such directory"


def _suggested(path: Path) -> str:
    return str(path.with_suffix("")) + "-int4" if path.suffix else f"{path}-int4"


def verify_directory(directory: Path, manifest: Optional[Manifest] = None) -> Manifest:
    """Check every shard and every component against the manifest; raise on the first fault."""
    directory = Path(directory)
    manifest = manifest or read_manifest(directory)
    headers = {}
    for shard, size in manifest.shards.items():
        path = directory / shard
        if not path.is_file():
            raise FormatError(f"{path}: shard is missing; re-convert the model")
        actual = path.stat().st_size
        if actual != size:
            raise FormatError(
                f"{path}: shard has {actual} bytes, manifest says {size} "
                "(truncated or replaced); re-convert the model"
            )
        headers[shard] = stfile.read_header(path)
    for name, entry in manifest.tensors.items():
        spec = manifest.spec_of(entry) if entry.quantized else manifest.spec
        _verify_entry(directory, name, entry, headers, spec)
    return manifest


def _verify_entry(directory, name, entry, headers, spec: QuantSpec) -> None:
    if entry.role not in QUANTIZED_ROLES + DENSE_ROLES:
        raise FormatError(f"{directory}: tensor {name!r} has unknown role {entry.role!r}")
    if entry.quantized:
        expected = spec.component_shapes(*entry.shape)
        if set(entry.components) != set(expected):
            raise FormatError(f"{directory}: tensor {name!r} has components "
                              f"{sorted(entry.components)}, expected {sorted(expected)}")
        for comp_name, (shape, dtype) in expected.items():
            comp = entry.components[comp_name]
            if tuple(comp.shape) != shape or comp.dtype != stfile.DTYPE_NAMES[dtype]:
                raise FormatError(f"{directory}: tensor {name!r} component {comp_name} "
                                  "does not match the scheme and shape in the manifest")
    for comp in entry.components.values():
        header = headers.get(comp.shard)
        info = None if header is None else header.get(comp.key)
        if info is None:
            raise FormatError(f"{directory / comp.shard}: tensor {comp.key!r} is missing "
                              f"(needed by {name!r}); re-convert the model")
        if tuple(info.shape) != tuple(comp.shape) or info.dtype_name != comp.dtype:
            raise FormatError(f"{directory / comp.shard}: tensor {comp.key!r} has shape "
                              f"{list(info.shape)} {info.dtype_name}, manifest says "
                              f"{comp.shape} {comp.dtype}; re-convert the model")


def load_component(directory: Path, comp: Component, headers: dict) -> torch.Tensor:
    """Read one stored component from its shard (headers: shard name -> parsed header)."""
    path = Path(directory) / comp.shard
    if comp.shard not in headers:
        headers[comp.shard] = stfile.read_header(path)
    info = headers[comp.shard].get(comp.key)
    if info is None:
        raise FormatError(f"{path}: tensor {comp.key!r} is missing; re-convert the model")
    return stfile.read_tensor(path, info)
