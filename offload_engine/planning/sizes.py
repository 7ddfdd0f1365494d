"""Bytes a weight takes on the device, in each form the cache can hold it.

A weight is held either ``packed`` (its quantized components, as stored: what the
fused kernel reads), ``dequantized`` (one dense matrix in the compute dtype) or, on CPU,
``prepacked`` (packed plus the CPU int4 kernel's form of it, built once at load). The
planner and the runtime arena both count with these functions, so a predicted
budget and a carved arena agree to the byte.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..kernels import cpu_int4
from ..quant.layout import QuantSpec
from ..quant.quantize import QuantizedWeight
from .words import CACHE_FORMATS  # noqa: F401  (re-exported: callers import it from here)

ALIGN_BYTES = 256  # every view in the arena starts on this boundary


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES


def held_nbytes(weight: QuantizedWeight, cache_format: str, dtype: torch.dtype) -> int:
    """Arena bytes one weight takes in the given form (each view aligned)."""
    if cache_format == "dequantized":
        return aligned(weight.out_features * weight.in_features * dtype.itemsize)
    packed = sum(aligned(t.numel() * t.element_size()) for t in weight.components().values())
    if cache_format == "prepacked":
        return packed + prepacked_nbytes(weight.spec, weight.out_features, weight.in_features)
    return packed


def prepacked_nbytes(spec: QuantSpec, out_features: int, in_features: int) -> int:
    """Extra bytes of the CPU kernel's form of one weight (0: its scheme has none)."""
    shapes = cpu_int4.prepacked_shapes(spec, out_features, in_features)
    return sum(aligned(_numel(shape) * dtype.itemsize) for shape, dtype in shapes.values())


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def auto_dtype(device_type: str, spec: Optional[QuantSpec] = None) -> torch.dtype:
    """--dtype auto: bfloat16 on CUDA; on CPU bfloat16 where the CPU int4 kernel runs the
    scheme (it reads the int4 codes where they lie, and only bfloat16 is vectorized there:
    kernels/cpu_int4.py), float32 otherwise (dequantized weights through F.linear)."""
    if device_type == "cuda" or (spec is not None and cpu_int4.supports(spec)):
        return torch.bfloat16
    return torch.float32


def auto_cache_format(device_type: str, dtype: torch.dtype,
                      spec: Optional[QuantSpec] = None) -> str:
    """--cache-format auto: packed on CUDA (the fused kernels read it); on CPU prepacked
    when the CPU int4 kernel runs this scheme at this dtype (bfloat16), else dequantized
    (float32 F.linear beats the reference's dequantize-per-call)."""
    if device_type == "cuda":
        return "packed"
    if spec is not None and dtype in cpu_int4.DTYPES and cpu_int4.supports(spec):
        return "prepacked"
    return "dequantized"
