"""GPTQ checkpoints (AutoGPTQ v1 and GPTQModel v2 packing, 4 bits), imported exactly.

Recognised by ``quant_method == "gptq"`` in config.json's ``quantization_config`` or in
the quantizer's own quantize_config.json (checkpoint/hfconfig.py); the packing
is :mod:`offload_engine.quant.gptq_pack`. ``checkpoint_format`` "gptq_v2" selects v2
zero points, "gptq" (or none) v1; other layouts (Marlin...) are refused. What cannot be
imported exactly (act-order g_idx, ambiguous v1 zero points, other bit widths or
per-channel groups) is found by reading the small g_idx and qzeros tensors when the
source is opened, before any work.
"""

from __future__ import annotations

from typing import Dict

import torch

from ...errors import QuantizationError, SourceError
from ...quant.gptq_pack import check_g_idx, unpack_gptq, unpack_zeros
from .packed import PackedSource

# checkpoint_format -> the packing version gptq_pack unpacks; Marlin, BitBLAS and other
# kernel layouts permute the codes and are refused.
PACKINGS = {"gptq": 1, "gptq_v2": 2}


class GPTQSource(PackedSource):
    """A Hugging Face directory quantized by AutoGPTQ, GPTQModel or optimum."""

    kind = "gptq"
    quant_method = "gptq"
    components = ("qweight", "qzeros", "scales")
    optional_components = ("g_idx",)

    def read_settings(self, settings: dict) -> int:
        bits = settings.get("bits")
        group_size = settings.get("group_size")
        problems = self.size_problems(bits, group_size, "; -1 is per-channel")
        fmt = str(settings.get("checkpoint_format", "gptq")).lower()
        if settings.get("is_marlin_format"):  # AutoGPTQ's older spelling of "marlin"
            fmt = "marlin"
        if fmt not in PACKINGS:
            problems.append(f"checkpoint_format {fmt!r} (its codes are laid out for one "
                            f"kernel; imported: {', '.join(PACKINGS)})")
        self.refuse_settings("GPTQ", problems)
        self.packing_version = PACKINGS[fmt]
        self.desc_act = bool(settings.get("desc_act", False))
        return int(group_size)

    def check_before_work(self) -> None:
        """Read every g_idx and qzeros (a few bytes per group) and refuse what we cannot
        hold: act-order and v1's ambiguous zero, named with the first tensor at fault."""
        for module, parts in self.packed.items():
            try:
                if "g_idx" in parts:
                    check_g_idx(self.read(parts["g_idx"]), self.group_size, f"{module}.weight")
                unpack_zeros(self.read(parts["qzeros"]), self.packing_version,
                             f"{module}.weight")
            except QuantizationError as exc:
                raise SourceError(f"{self.path}: {exc}") from exc

    def unpack(self, module: str, parts: Dict[str, torch.Tensor]):
        return unpack_gptq(parts["qweight"], parts["qzeros"], parts["scales"], self.group_size,
                           self.packing_version, g_idx=parts.get("g_idx"),
                           name=f"{module}.weight")

    @property
    def source_format(self) -> str:
        act = " desc_act" if self.desc_act else ""
        return f"gptq v{self.packing_version} int4 g{self.group_size}{act}"
