"""Kernels over quantized weights, reached only through :mod:`.gateway`.
Beside quant/ (stage 1b): may use quant/ and the package root only.
"""

from .gateway import force_reference, quantized_linear, reference_forced

__all__ = ["force_reference", "quantized_linear", "reference_forced"]
