"""A compressed-tensors checkpoint (llm-compressor's W4A16 ``pack-quantized``), imported
exactly: the int4 codes, scales and zero points are copied (see
:mod:`offload_engine.quant.ct_pack`), never re-rounded.

Recognised by config.json ``quantization_config.quant_method == "compressed-tensors"``.
Supported: format ``pack-quantized``, int weights of 4 bits, strategies ``group`` and
``channel``, symmetric or not, no activation quantization, no ``weight_g_idx`` (group
act-order). Anything else is refused when the source is opened, before any work.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Tuple

from ...errors import QuantizationError, SourceError
from ...quant.ct_pack import channel_group_size, import_weight
from ...quant.layout import QuantSpec
from .. import stfile
from ..hfconfig import quantization_settings
from .dense import FLOAT_DTYPES, SafetensorsSource

logger = logging.getLogger(__name__)
METHOD = "compressed-tensors"
PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def weight_args(path: Path, quantization: dict) -> dict:
    """The one weights-args dict every config group shares, or a SourceError saying why."""
    problems = []
    if quantization.get("format") != "pack-quantized":
        problems.append(f"format {quantization.get('format')!r} (only 'pack-quantized')")
    groups = quantization.get("config_groups") or {}
    args = [group.get("weights") or {} for group in groups.values()]
    if not args:
        problems.append("no config_groups")
    elif any(a != args[0] for a in args):
        problems.append("config groups with different weight settings (we hold one spec)")
    for name, group in groups.items():
        if group.get("input_activations") or group.get("output_activations"):
            problems.append(f"group {name} quantizes activations (only W4A16 is imported)")
        if group.get("format") not in (None, "pack-quantized"):
            problems.append(f"group {name} has format {group.get('format')!r}")
    weights = args[0] if args else {}
    if weights and (weights.get("num_bits") != 4 or weights.get("type") != "int"):
        problems.append(f"{weights.get('type')} {weights.get('num_bits')}-bit weights "
                        "(only int 4-bit)")
    if weights and weights.get("strategy") not in ("group", "channel"):
        problems.append(f"strategy {weights.get('strategy')!r} (only group and channel)")
    if weights.get("actorder") == "group":
        problems.append("actorder 'group' (weight_g_idx); a per-column group index has no "
                        "place in our contiguous groups")
    if problems:
        raise SourceError(f"{path}: this compressed-tensors checkpoint cannot be imported "
                          f"exactly: {'; '.join(problems)}. Convert the unquantized original "
                          "with `offload-engine quantize` instead")
    return weights


class CompressedTensorsSource(SafetensorsSource):
    """A safetensors directory whose linears are compressed-tensors pack-quantized int4."""

    kind = METHOD

    def __init__(self, directory: Path, requantize: bool = False):
        if requantize:
            raise SourceError(f"{directory}: --requantize is for GGUF files; a "
                              "compressed-tensors W4A16 checkpoint imports exactly without it")
        super().__init__(directory)
        self.weights = weight_args(self.path, quantization_settings(self.path)[0])
        self.modules = self._quantized_modules()
        self.import_spec = self._spec()
        self.requantized = self._float_linears()

    @classmethod
    def claims(cls, path: Path) -> bool:
        return (Path(path).is_dir()
                and quantization_settings(path)[0].get("quant_method") == METHOD)

    def _check_quantization(self) -> None:
        """Pre-quantized weights are what this source reads (the dense source refuses)."""

    def _quantized_modules(self) -> dict:
        """Module name -> {part: (shard, info)} for every module with a weight_packed."""
        modules: dict = {}
        for shard, header in self.headers:
            for key, info in header.items():
                module, _, part = key.rpartition(".")
                if part in PARTS:
                    modules.setdefault(module, {})[part] = (shard, info)
                if part == "weight_g_idx":
                    raise SourceError(f"{shard}: tensor {key!r} is a group act-order index, "
                                      "which has no exact import")
        return modules

    def _spec(self) -> QuantSpec:
        """The spec the first module imports as; every other one must match it."""
        if not self.modules:
            raise SourceError(f"{self.path}: no weight_packed tensors; is this checkpoint "
                              "compressed?")
        name = next(iter(self.modules))
        return self._import(name).spec

    def _read(self, module: str, part: str):
        entry = self.modules[module].get(part)
        if entry is None:
            return None
        shard, info = entry
        return stfile.read_tensor(shard, info)

    def _import(self, module: str):
        parts = self.modules[module]
        for needed in ("weight_packed", "weight_scale", "weight_shape"):
            if needed not in parts:
                raise SourceError(f"{self.path}: {module}.{needed} is missing; is the "
                                  "checkpoint complete?")
        if self.weights.get("symmetric") is False and "weight_zero_point" not in parts:
            raise SourceError(f"{self.path}: {module}.weight_zero_point is missing for an "
                              "asymmetric checkpoint")
        channel = self.weights["strategy"] == "channel"
        group_size = self._channel_group() if channel else self.weights.get("group_size")
        zero_point = (self._read(module, "weight_zero_point")
                      if self.weights.get("symmetric") is False else None)
        return import_weight(self._read(module, "weight_packed"),
                             self._read(module, "weight_scale"), zero_point,
                             self._read(module, "weight_shape").tolist(), group_size,
                             channel=channel, name=f"{module}.weight")

    def _channel_group(self) -> int:
        """The group size every linear's one scale per row is repeated over."""
        if not hasattr(self, "_channel_size"):
            sizes = [int(self._read(m, "weight_shape")[-1]) for m in self.modules]
            try:
                self._channel_size = channel_group_size(sizes)
            except QuantizationError as exc:
                raise SourceError(f"{self.path}: channel scales cannot be held: {exc}") from exc
        return self._channel_size

    def tensor_list(self):
        """(name, dtype, shape, stored bytes): one ``.weight`` per quantized module."""
        listing = []
        for _, header in self.headers:
            for key, info in header.items():
                module, _, part = key.rpartition(".")
                if module in self.modules and part in PARTS:
                    if part == "weight_packed":
                        stored = sum(i.nbytes for _, i in self.modules[module].values())
                        listing.append((f"{module}.weight", "I32", None, stored))
                else:
                    listing.append((key, info.dtype_name, info.shape, info.nbytes))
        return listing

    def iter_tensors(self) -> Iterator[Tuple[str, object]]:
        for shard, header in self.headers:
            for key, info in header.items():
                module, _, part = key.rpartition(".")
                if module in self.modules and part in PARTS:  # a bias is a plain tensor
                    if part == "weight_packed":
                        yield f"{module}.weight", self._checked(module)
                    continue
                if info.dtype_name not in FLOAT_DTYPES:
                    raise SourceError(f"{shard}: tensor {key!r} has dtype {info.dtype_name}, "
                                      "which is neither a float nor a compressed weight")
                yield key, self._dense(key, stfile.read_tensor(shard, info))

    def _checked(self, module: str):
        weight = self._import(module)
        if weight.spec != self.import_spec:
            raise SourceError(f"{self.path}: {module} is stored as {weight.spec}, other "
                              f"linears as {self.import_spec}; one model holds one spec")
        return weight

    def _dense(self, key: str, tensor):
        """A float tensor, as stored. A linear in it (``requantized``) is quantized by convert."""
        return tensor

    def _float_linears(self) -> list:
        """Linear weights left unquantized (the ``ignore`` list, e.g. an untied lm_head, as
        llm-compressor writes Qwen2.5 W4A16): our format holds every linear quantized, so
        they are quantized here with the import's spec and the import is not exact."""
        stored = {key for _, header in self.headers for key in header}
        floats = sorted(f"{name}.weight" for name in self._linear_names()
                        if name not in self.modules and f"{name}.weight" in stored)
        if floats:
            logger.warning("%s: %d linear weights are stored unquantized (%s); they are "
                           "quantized here (%s), not imported exactly", self.path, len(floats),
                           ", ".join(floats[:3]), self.import_spec)
        return floats

    def _linear_names(self) -> set:
        if not hasattr(self, "_linears"):
            from ...model import architecture

            skeleton = architecture.build_skeleton(self.config)
            tied = architecture.ties_embeddings(self.config)
            self._linears = {n for n in architecture.find_linears(skeleton, self.config)
                             if not (tied and n == "lm_head")}
        return self._linears

    def write_side_files(self, destination: Path) -> None:
        """As the dense source, minus config.json's quantization_config (compressed-tensors')."""
        self._write_side_files_unquantized(destination)

    @property
    def source_format(self) -> str:
        strategy = self.weights["strategy"]
        how = f"group {self.weights.get('group_size')}" if strategy == "group" else "channel"
        symmetry = "symmetric" if self.weights.get("symmetric", True) else "asymmetric"
        return f"compressed-tensors pack-quantized W4A16 {how} {symmetry}"
