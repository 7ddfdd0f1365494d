"""AutoAWQ's GEMM packing, unpacked into our layout exactly (pure functions, no I/O).

Layout as AutoAWQ's ``WQLinear_GEMM.from_linear`` packs it (and vLLM's AWQ loader and
GPTQModel's ``awq/utils/packing_utils.py`` unpack it, with the inverse order
``AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]``):

- ``qweight`` int32 (K, N / 8): the codes transposed to (K, N); word c of a row packs
  columns 8c .. 8c + 7, nibble i (shift 4i) holding column 8c + AWQ_ORDER[i].
- ``qzeros`` int32 (K / group, N / 8): the zero points, packed the same way.
- ``scales`` fp16 (K / group, N).

Value = (code - zero) * scale: our ``int4-asym`` with fp16 scales.
"""

from __future__ import annotations

import torch

from .int32_pack import to_quantized_weight, unpack_last_dim
from .quantize import QuantizedWeight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i holds column AWQ_ORDER[i] of its eight


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               group_size: int, name: str = "<tensor>") -> QuantizedWeight:
    """Our QuantizedWeight of one AWQ GEMM linear (codes, zeros and scales copied)."""
    codes_kn = unpack_last_dim(qweight, AWQ_ORDER)  # (K, N)
    zeros_gn = unpack_last_dim(qzeros, AWQ_ORDER)  # (G, N)
    return to_quantized_weight(name, codes_kn, zeros_gn, scales, group_size)
