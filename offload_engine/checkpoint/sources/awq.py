"""AutoAWQ checkpoints (GEMM packing, 4 bits, with zero points), imported exactly.

Recognised by ``quant_method == "awq"`` in config.json's ``quantization_config`` or by
the quant_config.json older AutoAWQ releases wrote (checkpoint/hfconfig.py); the packing
itself is :mod:`offload_engine.quant.awq_pack`. Other AWQ packings (GEMV, GEMV-fast,
Marlin) order their codes differently and are refused before work starts.
"""

from __future__ import annotations

from typing import Dict

import torch

from ...quant.awq_pack import unpack_awq
from .packed import PackedSource

SUPPORTED_VERSIONS = ("gemm",)


class AWQSource(PackedSource):
    """A Hugging Face directory quantized by AutoAWQ (or llm-awq's GEMM export)."""

    kind = "awq"
    quant_method = "awq"
    components = ("qweight", "qzeros", "scales")

    def read_settings(self, settings: dict) -> int:
        bits = settings.get("bits", settings.get("w_bit"))
        group_size = settings.get("group_size", settings.get("q_group_size"))
        version = str(settings.get("version", "gemm")).lower()
        problems = self.size_problems(bits, group_size)
        if version not in SUPPORTED_VERSIONS:
            problems.append(f"version {version!r} (only 'gemm' packing is imported)")
        if settings.get("zero_point", True) is not True:
            problems.append("zero_point false (only asymmetric AWQ is imported)")
        self.refuse_settings("AWQ", problems)
        self.version = version
        return int(group_size)

    def unpack(self, module: str, parts: Dict[str, torch.Tensor]):
        return unpack_awq(parts["qweight"], parts["qzeros"], parts["scales"],
                          self.group_size, name=f"{module}.weight")

    @property
    def source_format(self) -> str:
        return f"awq {self.version} int4 g{self.group_size}"
