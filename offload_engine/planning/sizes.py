"""Bytes a weight takes on the device, in each form the cache can hold it.

A weight is held either ``packed`` (its quantized components, as stored: what the
fused kernel reads) or ``dequantized`` (one dense matrix in the compute dtype). The
planner and the runtime arena both count with these functions, so a predicted
budget and a carved arena agree to the byte.
"""

from __future__ import annotations

import torch

from ..quant.quantize import QuantizedWeight
from .words import CACHE_FORMATS  # noqa: F401  (re-exported: callers import it from here)

ALIGN_BYTES = 256  # every view in the arena starts on this boundary


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES


def held_nbytes(weight: QuantizedWeight, cache_format: str, dtype: torch.dtype) -> int:
    """Arena bytes one weight takes in the given form (each view aligned)."""
    if cache_format == "dequantized":
        return aligned(weight.out_features * weight.in_features * dtype.itemsize)
    return sum(aligned(t.numel() * t.element_size()) for t in weight.components().values())
