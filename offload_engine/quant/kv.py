"""Quantize and dequantize KV cache states: pure functions, per token, head and group.

States arrive as (..., head_dim) in the compute dtype. Each group of ``group_size``
consecutive elements of the head dimension gets a float16 minimum and a float16 scale
(asymmetric, as LMDeploy's online KV quantization), and each element an unsigned code:
value ~= code * scale + minimum. int8 codes take a byte; int4 codes are packed two per
byte, element ``2j`` in the low nibble of byte ``j`` (the weight layout's nibble order).

The float16 minimum and scale assume the states stay within float16's range (|x| < 65504),
as float16 models already require.
"""

from __future__ import annotations

from typing import Tuple

import torch


def quantize_kv(states: torch.Tensor, bits: int,
                group_size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 (..., D*bits/8), scale fp16 (..., D/g), minimum fp16 (..., D/g))."""
    *lead, dim = states.shape
    groups = states.float().reshape(*lead, dim // group_size, group_size)  # (..., G, g)
    qmax = (1 << bits) - 1
    # Round the minimum and scale to float16 first and compute the codes with the rounded
    # values, so that dequantizing reproduces what was rounded here.
    minimum = groups.amin(-1, keepdim=True).to(torch.float16)
    scale = ((groups.amax(-1, keepdim=True) - minimum.float()) / qmax).to(torch.float16)
    divisor = torch.where(scale > 0, scale.float(), torch.ones((), device=states.device))
    codes = ((groups - minimum.float()) / divisor).round_().clamp_(0, qmax).to(torch.uint8)
    codes = codes.reshape(*lead, dim)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, scale.squeeze(-1), minimum.squeeze(-1)


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, bits: int,
                  group_size: int, out: torch.Tensor) -> torch.Tensor:
    """Write code * scale + minimum into ``out`` (..., D), a view whose last dim is dense.

    ``out`` may be a slice of a larger scratch buffer: nothing is allocated beyond the
    unpacked nibbles of int4.
    """
    if bits == 4:
        out[..., 0::2].copy_(codes & 0x0F)
        out[..., 1::2].copy_(codes >> 4)
    else:
        out.copy_(codes)
    grouped = out.unflatten(-1, (out.shape[-1] // group_size, group_size))  # (..., G, g)
    grouped.mul_(scale.unsqueeze(-1)).add_(minimum.unsqueeze(-1))
    return out
