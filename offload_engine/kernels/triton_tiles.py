"""Shared Triton pieces: reading one tile of a quantized weight into registers.

Importing this module imports triton and defines (never compiles) the jit helpers;
the gateway imports it lazily, only when a Triton path is about to run.

The layout read here is the one of :mod:`offload_engine.quant.layout`: row n of an int4
weight holds element 2j in the low nibble of byte j and element 2j + 1 in the high
nibble; int8 weights store signed values; one bf16 or fp16 scale (and one uint8 zero
point for int4-asym, or one float minimum for int4-min) per ``group_size`` elements
along the padded input dimension. Raw-block weights (GGUF Q4_K...) are read by
:mod:`.triton_blocks`, chosen by the BLOCKS constexpr (0: our own layout).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant import layout
from ..quant.quantize import QuantizedWeight
from .triton_blocks import load_block_tile

# The symmetric int4 offset, as a value the jit functions can fold in.
SYM_OFFSET = tl.constexpr(layout.INT4_SYMMETRIC_OFFSET)
NIBBLE_MASK = tl.constexpr(0x0F)
OFFSET_ZERO = tl.constexpr(layout.OFFSET_ZERO)
OFFSET_MIN = tl.constexpr(layout.OFFSET_MIN)

# Activation dtypes the Triton paths accept; anything else goes to the reference.
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# Triton decides at definition time whether a @triton.jit function is interpreted, so
# the kernels of this package follow the setting in force when this module was imported.
_INTERPRETED = bool(triton.knobs.runtime.interpret)


def interpreted() -> bool:
    """True when the kernels run in triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return _INTERPRETED


def check_launchable(x: torch.Tensor, weight: QuantizedWeight) -> None:
    """Raise a clear error before launching a Triton kernel on inputs it cannot take."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"Triton quantized linear takes bf16/fp16/fp32 inputs, got {x.dtype}")
    if x.shape[-1] != weight.in_features:
        raise ValueError(
            f"input has {x.shape[-1]} features but the weight expects {weight.in_features}"
        )
    for name, part in weight.components().items():
        if part.device != x.device:
            raise ValueError(f"weight {name} is on {part.device} but the input is on {x.device}")
        if not part.is_contiguous():
            raise ValueError(f"weight {name} must be contiguous for the Triton kernels")
    if not x.is_cuda and not interpreted():
        raise RuntimeError(
            "Triton kernels need a CUDA tensor; to run them on CPU set TRITON_INTERPRET=1 "
            "before triton is imported"
        )


def block_k_for(group_size: int, block_k: int) -> int:
    """A K tile is a whole number of groups: at least one group, a multiple of it."""
    block_k = max(block_k, group_size)
    if block_k % group_size:
        raise ValueError(f"BLOCK_K {block_k} is not a multiple of the group size {group_size}")
    return block_k


@triton.jit
def load_weight_tile(
    q_ptr, s_ptr, z_ptr, offs_n, k0, N, padded_in, n_groups,
    GROUP: tl.constexpr, BITS: tl.constexpr, OFFSET: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCKS: tl.constexpr, BLOCK_BYTES: tl.constexpr,
):
    """Dequantized float32 tile W[offs_n, k0:k0 + BLOCK_K]; zero outside the weight.

    BLOCKS is 0 for our layout, else the raw-block type (:func:`block_args`) with GROUP
    elements and BLOCK_BYTES bytes per block.
    """
    if BLOCKS == 0:
        w = _layout_tile(q_ptr, s_ptr, z_ptr, offs_n, k0, N, padded_in, n_groups,
                         GROUP, BITS, OFFSET, BLOCK_N, BLOCK_K)
    else:
        w = load_block_tile(q_ptr, offs_n, k0, N, padded_in, BLOCKS, GROUP, BLOCK_BYTES,
                            BLOCK_N, BLOCK_K)
    return w


@triton.jit
def _layout_tile(
    q_ptr, s_ptr, z_ptr, offs_n, k0, N, padded_in, n_groups,
    GROUP: tl.constexpr, BITS: tl.constexpr, OFFSET: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Tile of a weight in our layout. OFFSET is the spec's offset_mode: z_ptr holds zero
    points (OFFSET_ZERO), float minimums (OFFSET_MIN) or nothing that is read."""
    rows = offs_n.to(tl.int64)
    n_mask = offs_n < N
    if BITS == 4:
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        mask = n_mask[:, None] & (offs_b[None, :] < padded_in // 2)
        ptrs = q_ptr + rows[:, None] * (padded_in // 2) + offs_b[None, :]
        packed = tl.load(ptrs, mask=mask, other=0)  # (BLOCK_N, BLOCK_K // 2) uint8
        low = (packed & NIBBLE_MASK).to(tl.float32)
        high = (packed >> 4).to(tl.float32)
        codes = tl.interleave(low, high)  # (BLOCK_N, BLOCK_K): element 2j, then 2j + 1
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = n_mask[:, None] & (offs_k[None, :] < padded_in)
        ptrs = q_ptr + rows[:, None] * padded_in + offs_k[None, :]
        codes = tl.load(ptrs, mask=mask, other=0).to(tl.float32)
    GROUPS_PER_TILE: tl.constexpr = BLOCK_K // GROUP
    offs_g = k0 // GROUP + tl.arange(0, GROUPS_PER_TILE)
    g_mask = n_mask[:, None] & (offs_g[None, :] < n_groups)
    g_offs = rows[:, None] * n_groups + offs_g[None, :]
    # Masked scales read as 0, so every element outside the weight dequantizes to 0.
    scales = tl.load(s_ptr + g_offs, mask=g_mask, other=0).to(tl.float32)
    grouped = tl.reshape(codes, (BLOCK_N, GROUPS_PER_TILE, GROUP))
    if OFFSET == OFFSET_ZERO:
        zeros = tl.load(z_ptr + g_offs, mask=g_mask, other=0).to(tl.float32)
        grouped = grouped - zeros[:, :, None]
    elif BITS == 4 and OFFSET != OFFSET_MIN:
        grouped = grouped - SYM_OFFSET
    dense = grouped * scales[:, :, None]
    if OFFSET == OFFSET_MIN:  # code * scale + min; masked minimums read as 0 like scales
        mins = tl.load(z_ptr + g_offs, mask=g_mask, other=0).to(tl.float32)
        dense = dense + mins[:, :, None]
    return tl.reshape(dense, (BLOCK_N, BLOCK_K))


def block_args(weight: QuantizedWeight) -> dict:
    """The BLOCKS and BLOCK_BYTES constexprs of a weight: (0, 0) for our own layout."""
    fmt = weight.spec.block_format
    if fmt is None:
        return {"BLOCKS": 0, "BLOCK_BYTES": 0}
    return {"BLOCKS": fmt.kernel_code, "BLOCK_BYTES": fmt.block_bytes}


def weight_args(weight: QuantizedWeight) -> tuple:
    """(qweight, scales, zeros-or-mins-or-scales, padded_in, n_groups) as the kernels take
    them: the third is read only when the spec's offset_mode says so (raw-block weights
    have no scales: qweight stands in, unread)."""
    spec = weight.spec
    scales = weight.scales if weight.scales is not None else weight.qweight
    zeros = weight.zeros if weight.zeros is not None else weight.mins
    zeros = zeros if zeros is not None else scales  # unread dummy
    padded = spec.padded_in(weight.in_features)
    return weight.qweight, scales, zeros, padded, padded // spec.group_size
