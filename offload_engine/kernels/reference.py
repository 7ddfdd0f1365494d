"""Pure-torch reference for every kernel: the definition the fast paths must match."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..quant.quantize import QuantizedWeight, dequantize_weight


def quantized_linear_reference(
    x: torch.Tensor, weight: QuantizedWeight, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """y = x @ dequant(W).T + bias, with the weight dequantized in x's dtype."""
    dense = dequantize_weight(weight, dtype=x.dtype)
    return F.linear(x, dense, bias)
