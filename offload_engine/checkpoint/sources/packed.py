"""A safetensors directory whose linears are stored as packed int32 codes (AWQ, GPTQ).

The format modules (:mod:`.awq`, :mod:`.gptq`) say which ``quant_method`` is theirs,
which settings of ``quantization_config`` they can import exactly, which stored
components make up one linear and how to unpack them; this module does the rest:
read shard headers, group components by linear, stream one linear at a time.

Linears the checkpoint keeps in float (AWQ and GPTQ leave ``lm_head`` unquantized, and
``modules_to_not_convert``) have no codes to copy: they are quantized by us with the
imported spec (int4-asym, fp16 scales), listed in ``requantized`` and logged, so the
manifest can say the import was not exact for them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import torch

from ...errors import QuantizationError, SourceError
from ...model import architecture
from ...quant.layout import QuantSpec
from ...quant.quantize import dequantize_weight
from ...quant.schemes import GROUP_SIZES
from .. import stfile
from ..hfconfig import quantization_settings, read_hf_config
from .dense import FLOAT_DTYPES, SafetensorsSource

logger = logging.getLogger(__name__)


class PackedSource(SafetensorsSource):
    """Base of the AWQ and GPTQ sources; subclasses set the class attributes below."""

    kind = "packed"
    quant_method = ""  # quantization_config.quant_method (hfconfig.quantization_settings)
    components: Tuple[str, ...] = ()  # stored suffixes of one linear, e.g. ("qweight", ...)
    optional_components: Tuple[str, ...] = ()  # present in some checkpoints only

    def __init__(self, directory: Path, requantize: bool = False):
        self.path = Path(directory)
        self.shards = sorted(self.path.glob("*.safetensors"))
        if not self.shards:
            raise SourceError(f"{self.path}: no *.safetensors files here")
        self.config = read_hf_config(self.path, SourceError,
                                     fix="copy it from the model's repository")
        self.settings, self.settings_file = quantization_settings(self.path)
        self.group_size = self.read_settings(self.settings)  # raises SourceError
        self.headers = [(shard, stfile.read_header(shard)) for shard in self.shards]
        self.where = {key: (shard, info) for shard, header in self.headers
                      for key, info in header.items()}
        self.packed = self._find_packed()
        self.requantized = self._float_linears()
        self.requantize = requantize
        self.import_spec = None if requantize else QuantSpec("int4-asym", self.group_size,
                                                             "fp16")
        if not requantize:
            self.check_before_work()

    # --- what a format module provides ---------------------------------------------

    def read_settings(self, settings: dict) -> int:
        """Check quantization_config; return the group size or raise SourceError."""
        raise NotImplementedError

    def unpack(self, module: str, parts: Dict[str, torch.Tensor]):
        """A QuantizedWeight from one linear's stored components."""
        raise NotImplementedError

    def check_before_work(self) -> None:
        """Refuse, before any work, what cannot be imported exactly (default: nothing)."""

    # --- shared by the format modules' read_settings -----------------------------------

    def size_problems(self, bits, group_size, per_channel_note: str = "") -> List[str]:
        """What keeps ``bits`` and ``group_size`` from an exact import (empty: nothing)."""
        problems = []
        if bits != 4:
            problems.append(f"bits {bits} (4 is supported)")
        if group_size not in GROUP_SIZES:
            problems.append(f"group_size {group_size} (supported: "
                            f"{', '.join(map(str, GROUP_SIZES))}{per_channel_note})")
        return problems

    def refuse_settings(self, label: str, problems: List[str]) -> None:
        """SourceError naming the settings file and every problem, when there are any."""
        if problems:
            raise SourceError(f"{self.path}: this {label} checkpoint cannot be imported exactly "
                              f"({self.settings_file}): {'; '.join(problems)}. Convert the "
                              "unquantized original instead")

    @classmethod
    def claims(cls, path: Path) -> bool:
        return (Path(path).is_dir() and any(Path(path).glob("*.safetensors"))
                and quantization_settings(path)[0].get("quant_method") == cls.quant_method)

    # --- shared machinery -----------------------------------------------------------

    def _find_packed(self) -> Dict[str, Dict[str, str]]:
        """{module: {component: key}} for every linear stored packed."""
        packed: Dict[str, Dict[str, str]] = {}
        for key in self.where:
            module, _, suffix = key.rpartition(".")
            if suffix == self.components[0]:
                packed[module] = {}
        for module, parts in packed.items():
            for suffix in self.components + self.optional_components:
                if f"{module}.{suffix}" in self.where:
                    parts[suffix] = f"{module}.{suffix}"
            missing = [s for s in self.components if s not in parts]
            if missing:
                raise SourceError(f"{self.path}: linear {module!r} lacks {', '.join(missing)}; "
                                  "is the checkpoint complete?")
        if not packed:
            raise SourceError(f"{self.path}: {self.settings_file} says {self.quant_method} but no "
                              f"tensor ends in .{self.components[0]}; is this the right "
                              "directory?")
        return packed

    def _float_linears(self) -> List[str]:
        """Linear weights stored in float: quantized by us, so not imported exactly."""
        skeleton = architecture.build_skeleton(self.config)
        linears = architecture.find_linears(skeleton, self.config)
        floats = sorted(f"{name}.weight" for name in linears
                        if name not in self.packed and f"{name}.weight" in self.where)
        if floats:
            logger.warning("%s: %d linear weights are stored unquantized (%s); they are "
                           "quantized here (int4-asym g%d, fp16 scales), not imported exactly",
                           self.path, len(floats), ", ".join(floats[:3]), self.group_size)
        return floats

    def read(self, key: str) -> torch.Tensor:
        shard, info = self.where[key]
        return stfile.read_tensor(shard, info)

    def tensor_list(self) -> List[Tuple[str, str, tuple, int]]:
        """(name, dtype, shape, stored bytes); a packed linear is listed once, as .weight."""
        listing, packed_keys = [], set()
        for module, parts in self.packed.items():
            packed_keys.update(parts.values())
            shape = self._logical_shape(module, parts)
            nbytes = sum(self.where[key][1].nbytes for key in parts.values())
            listing.append((f"{module}.weight", "I32", shape, nbytes))
        for key, (_, info) in self.where.items():
            if key not in packed_keys:
                listing.append((key, info.dtype_name, info.shape, info.nbytes))
        return listing

    def _logical_shape(self, module: str, parts: Dict[str, str]) -> tuple:
        """(N, K) from the scales (G, N) and the group size."""
        groups, out_features = self.where[parts["scales"]][1].shape
        return (out_features, groups * self.group_size)

    def iter_tensors(self) -> Iterator[Tuple[str, object]]:
        packed_keys = {key for parts in self.packed.values() for key in parts.values()}
        for module, parts in self.packed.items():
            weight = self.unpacked(module, parts)
            yield f"{module}.weight", (dequantize_weight(weight) if self.requantize else weight)
        for key, (shard, info) in self.where.items():
            if key in packed_keys:
                continue
            if info.dtype_name not in FLOAT_DTYPES:
                raise SourceError(f"{shard}: tensor {key!r} has dtype {info.dtype_name}, which "
                                  f"is no part of a {self.quant_method} linear we know")
            yield key, stfile.read_tensor(shard, info)

    def unpacked(self, module: str, parts: Dict[str, str]):
        try:
            return self.unpack(module, {s: self.read(key) for s, key in parts.items()})
        except QuantizationError as exc:
            raise SourceError(f"{self.path}: {exc}") from exc

    @property
    def source_format(self) -> str:
        raise NotImplementedError
