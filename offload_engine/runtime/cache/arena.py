"""Carving weights out of the one preallocated device arena.

A weight is held either ``packed`` (its quantized components, as stored: what the
fused kernel reads), ``dequantized`` (one dense matrix in the compute dtype: what
a plain matmul reads) or ``prepacked`` (CPU: packed plus the CPU int4 kernel's form,
built by the copy, so a resident weight is prepacked once, at load). The byte counts
here are the real bytes of each form, so the budget means what it says. The sizes
themselves are counted in :mod:`offload_engine.planning.sizes`, so the planner and the
arena agree.
"""

from __future__ import annotations

from typing import Union

import torch

from ...kernels import cpu_int4
from ...planning.sizes import aligned
from ...quant.quantize import QuantizedWeight

Held = Union[QuantizedWeight, torch.Tensor]


def _view(arena: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    nbytes = like.numel() * like.element_size()
    return arena[offset: offset + nbytes].view(like.dtype).view(like.shape)


def carve(arena: torch.Tensor, offset: int, weight: QuantizedWeight, cache_format: str,
          dtype: torch.dtype) -> Held:
    """Views into ``arena`` at ``offset`` shaped like ``weight`` in the held form."""
    if cache_format == "dequantized":
        shape = (weight.out_features, weight.in_features)
        nbytes = shape[0] * shape[1] * dtype.itemsize
        return arena[offset: offset + nbytes].view(dtype).view(shape)
    parts = {}
    for name, tensor in weight.components().items():
        parts[name] = _view(arena, offset, tensor)
        offset += aligned(tensor.numel() * tensor.element_size())
    held = QuantizedWeight.from_parts(parts, weight.spec, weight.out_features,
                                      weight.in_features)
    if cache_format != "prepacked":
        return held
    shapes = cpu_int4.prepacked_shapes(weight.spec, weight.out_features, weight.in_features)
    if not shapes:  # a scheme the CPU kernel does not hold: held packed, run by the reference
        return held
    extra = {}
    for name, (shape, part_dtype) in shapes.items():
        nbytes = _numel(shape) * part_dtype.itemsize
        extra[name] = arena[offset: offset + nbytes].view(part_dtype).view(shape)
        offset += aligned(nbytes)
    return cpu_int4.PrepackedWeight(held.qweight, held.scales, held.zeros, held.spec,
                                    held.out_features, held.in_features, mins=held.mins,
                                    **extra)


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
