"""Kernels over quantized weights, reached only through :mod:`.gateway`."""

from .gateway import force_reference, quantized_linear, reference_forced

__all__ = ["force_reference", "quantized_linear", "reference_forced"]
