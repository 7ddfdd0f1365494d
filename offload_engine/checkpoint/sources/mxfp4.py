"""gpt-oss checkpoints with MXFP4 experts (``quant_method: mxfp4``), imported exactly.

OpenAI's gpt-oss repositories keep each experts matrix as ``...experts.gate_up_proj_blocks``
(E, N, K/32, 16) and ``..._scales`` (E, N, K/32), uint8: 4-bit e2m1 codes under one
power-of-two (e8m0) scale per 32 elements; everything else (attention, router,
embeddings, ``lm_head``, the experts' biases) is bf16. The experts become raw-block
``mxfp4`` entries, one per expert per matrix (:mod:`offload_engine.quant.mxfp4`: only the
nibble order changes), handed over one expert at a time (:class:`..keymap.PerExpert`);
the float linears (attention, ``lm_head``) have no codes to copy and are quantized here
to int8 g32 fp16 scales (the form of GGUF's Q8_0), listed in ``requantized``.
``--requantize`` dequantizes the experts instead, to be quantized with ``--scheme``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

from ...errors import QuantizationError, SourceError
from ...model import architecture
from ...model.experts import find_experts
from ...quant import mxfp4
from ...quant.layout import QuantSpec
from ...quant.quantize import dequantize_weight
from .. import stfile
from ..hfconfig import quantization_settings
from ..keymap import PerExpert
from .dense import FLOAT_DTYPES, SafetensorsSource

logger = logging.getLogger(__name__)
METHOD = "mxfp4"
PARTS = ("_blocks", "_scales")
FLOAT_SPEC = QuantSpec("int8", 32, "fp16")  # the float linears (no MXFP4 writer here)


class MXFP4Source(SafetensorsSource):
    """A safetensors directory whose experts are gpt-oss MXFP4 blocks and scales."""

    kind = METHOD

    def __init__(self, directory: Path, requantize: bool = False):
        super().__init__(directory)
        self.requantize = requantize
        self.where = {key: (shard, info) for shard, header in self.headers
                      for key, info in header.items()}
        self.stacks = self._find_stacks()
        self.import_spec = None if requantize else mxfp4.SPEC
        self.requantize_spec = None if requantize else FLOAT_SPEC
        self.requantized = [] if requantize else self._float_linears()

    @classmethod
    def claims(cls, path: Path) -> bool:
        return (Path(path).is_dir()
                and quantization_settings(path)[0].get("quant_method") == METHOD)

    def _check_quantization(self) -> None:
        """MXFP4 experts are what this source reads (the dense source refuses them)."""

    def _find_stacks(self) -> Dict[str, Tuple[str, str]]:
        """{experts parameter: (blocks key, scales key)}; refuses MXFP4 tensors that are
        not an experts parameter of this model, or a blocks tensor without its scales."""
        skeleton = architecture.build_skeleton(self.config)
        params = {f"{name}.{m.param}" for name, info in find_experts(skeleton).items()
                  for m in info.matrices}
        stacks = {}
        for key in self.where:
            if not key.endswith(PARTS):
                continue
            param = key[:-len("_blocks")]
            if param not in params:
                raise SourceError(f"{self.path}: {key!r} is MXFP4 but {param} is no experts "
                                  "parameter of this model; only gpt-oss-style MXFP4 experts "
                                  "are imported. Convert the unquantized original instead")
            blocks, scales = f"{param}_blocks", f"{param}_scales"
            if blocks not in self.where or scales not in self.where:
                raise SourceError(f"{self.path}: {param} has {key} without its "
                                  f"{'scales' if key == blocks else 'blocks'}; is the "
                                  "checkpoint complete?")
            stacks[param] = (blocks, scales)
        if not stacks:
            raise SourceError(f"{self.path}: quant_method is mxfp4 but no tensor ends in "
                              "_blocks; is this the right directory?")
        return stacks

    def _float_linears(self) -> List[str]:
        skeleton = architecture.build_skeleton(self.config)
        tied = architecture.ties_embeddings(self.config)
        floats = sorted(f"{name}.weight" for name in architecture.find_linears(skeleton,
                                                                               self.config)
                        if f"{name}.weight" in self.where and not (tied and name == "lm_head"))
        if floats:
            logger.warning("%s: %d linear weights are stored in bf16 beside the MXFP4 experts "
                           "(%s); they are quantized here (%s), not imported exactly",
                           self.path, len(floats), ", ".join(floats[:3]), FLOAT_SPEC)
        return floats

    def tensor_list(self) -> List[Tuple[str, str, tuple, int]]:
        """(name, dtype, shape, stored bytes): one entry per experts parameter."""
        listing = []
        for key, (_, info) in self.where.items():
            if key.endswith("_scales") and key[:-len("_scales")] in self.stacks:
                continue
            param = key[:-len("_blocks")]
            if key.endswith("_blocks") and param in self.stacks:
                scales = self.where[self.stacks[param][1]][1]
                listing.append((param, "U8", info.shape, info.nbytes + scales.nbytes))
            else:
                listing.append((key, info.dtype_name, info.shape, info.nbytes))
        return listing

    def iter_tensors(self) -> Iterator[Tuple[str, object]]:
        for key, (shard, info) in self.where.items():
            param = key[:-len("_blocks")]
            if key.endswith(PARTS) and param in self.stacks:
                if key.endswith("_blocks"):
                    yield param, PerExpert(info.shape[0], lambda e, p=param: self._expert(p, e))
                continue
            if info.dtype_name not in FLOAT_DTYPES:
                raise SourceError(f"{shard}: tensor {key!r} has dtype {info.dtype_name}, which "
                                  "is neither a float nor an MXFP4 experts tensor")
            yield key, stfile.read_tensor(shard, info)

    def _expert(self, param: str, expert: int):
        """Expert ``expert``'s matrix of ``param``: read from its slice of the file."""
        blocks, scales = (self._slice(key, expert) for key in self.stacks[param])
        name = f"{param}[{expert}]"
        try:
            weight = mxfp4.import_expert(blocks, scales, name)
        except QuantizationError as exc:
            raise SourceError(f"{self.path}: {exc}") from exc
        return dequantize_weight(weight) if self.requantize else weight

    def _slice(self, key: str, expert: int):
        shard, info = self.where[key]
        count = info.shape[0]
        if info.dtype_name != "U8" or info.nbytes % max(count, 1):
            raise SourceError(f"{shard}: {key!r} is {info.dtype_name} {info.shape}, not "
                              "gpt-oss's uint8 MXFP4 layout")
        step = info.nbytes // count
        part = dataclasses.replace(info, key=f"{key}[{expert}]", shape=info.shape[1:],
                                   begin=info.begin + expert * step,
                                   end=info.begin + (expert + 1) * step)
        return stfile.read_tensor(shard, part)

    def write_side_files(self, destination: Path) -> None:
        """As the dense source, minus config.json's quantization_config (MXFP4's)."""
        self._write_side_files_unquantized(destination)

    @property
    def source_format(self) -> str:
        return "gpt-oss mxfp4 experts"
