"""What AWQ and GPTQ checkpoints share: eight 4-bit codes packed in each int32.

Both formats store a weight (N out, K in) transposed, as (K, N), with per-group fp16
``scales`` (K / group, N) and 4-bit zero points packed eight to an int32 along N
(``qzeros``, (K / group, N / 8)); a value is ``(code - zero) * scale``. That is our
``int4-asym`` with fp16 scales (:mod:`offload_engine.quant.layout`), so an import only
moves codes between packings and never rounds a value. The format modules
(:mod:`.awq_pack`, :mod:`.gptq_pack`) say which nibble holds which element.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import QuantizationError
from . import layout
from .layout import QuantSpec
from .quantize import QuantizedWeight

CODES_PER_INT32 = 8
BITS = 4
SEQUENTIAL_ORDER = tuple(range(CODES_PER_INT32))  # nibble i holds element i (GPTQ)
CHUNK_WORDS = 1 << 20  # int32 words unpacked at once


def unpack_last_dim(packed: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
    """int32 (R, C) -> uint8 codes (R, C * 8): nibble i of word c holds element
    8c + order[i] (shift 4 * i)."""
    _check_int32(packed)
    shifts = torch.arange(0, 32, BITS, dtype=torch.int32)
    inverse = torch.argsort(torch.tensor(order))  # element j sits in nibble inverse[j]
    codes = torch.empty(packed.shape[0], packed.shape[1] * CODES_PER_INT32, dtype=torch.uint8)
    for start in range(0, packed.shape[0], _rows_per_chunk(packed)):
        rows = packed[start:start + _rows_per_chunk(packed)]
        nibbles = (rows.unsqueeze(-1) >> shifts) & 0xF  # (rows, C, 8), nibble order
        codes[start:start + rows.shape[0]] = nibbles[..., inverse].reshape(rows.shape[0], -1)
    return codes


def unpack_first_dim(packed: torch.Tensor) -> torch.Tensor:
    """int32 (R, C) -> uint8 codes (R * 8, C): nibble i of row r holds row 8r + i."""
    _check_int32(packed)
    shifts = torch.arange(0, 32, BITS, dtype=torch.int32).reshape(1, -1, 1)
    codes = torch.empty(packed.shape[0] * CODES_PER_INT32, packed.shape[1], dtype=torch.uint8)
    for start in range(0, packed.shape[0], _rows_per_chunk(packed)):
        rows = packed[start:start + _rows_per_chunk(packed)]
        nibbles = (rows.unsqueeze(1) >> shifts) & 0xF  # (rows, 8, C)
        codes[start * CODES_PER_INT32:(start + rows.shape[0]) * CODES_PER_INT32] = \
            nibbles.reshape(-1, packed.shape[1])
    return codes


def _rows_per_chunk(packed: torch.Tensor) -> int:
    """Packed rows unpacked at once: bounds the int32 temporaries (8 per word) whatever
    the tensor size, so a 32B model's largest linear needs tens of MB, not gigabytes."""
    return max(1, CHUNK_WORDS // max(1, packed.shape[1]))


def _check_int32(packed: torch.Tensor) -> None:
    if packed.dtype != torch.int32:
        raise QuantizationError(f"expected int32 packed codes, got {packed.dtype}")


def check_shapes(name: str, codes_kn: torch.Tensor, zeros_gn: torch.Tensor,
                 scales_gn: torch.Tensor, group_size: int) -> None:
    """The unpacked (K, N) codes, (G, N) zeros and (G, N) scales agree with group_size."""
    in_features, out_features = codes_kn.shape
    if in_features % group_size:
        raise QuantizationError(f"tensor {name!r}: input size {in_features} is not a multiple "
                                f"of group size {group_size}; the checkpoint is inconsistent")
    groups = in_features // group_size
    if tuple(scales_gn.shape) != (groups, out_features) or tuple(zeros_gn.shape) != (
            groups, out_features):
        raise QuantizationError(
            f"tensor {name!r}: scales {tuple(scales_gn.shape)} / zeros {tuple(zeros_gn.shape)} "
            f"do not match {groups} groups of {group_size} x {out_features} outputs; is the "
            "checkpoint damaged, or its group_size in config.json wrong?")
    if scales_gn.dtype != torch.float16:
        raise QuantizationError(f"tensor {name!r}: scales are {scales_gn.dtype}, expected "
                                "float16; this packing is not one we import exactly")


def to_quantized_weight(name: str, codes_kn: torch.Tensor, zeros_gn: torch.Tensor,
                        scales_gn: torch.Tensor, group_size: int) -> QuantizedWeight:
    """Our int4-asym fp16 weight from transposed (K, N) codes and (G, N) zeros/scales."""
    check_shapes(name, codes_kn, zeros_gn, scales_gn, group_size)
    if int(zeros_gn.max()) > layout.INT4_CODE_MAX:
        raise QuantizationError(f"tensor {name!r}: a zero point above {layout.INT4_CODE_MAX}")
    in_features, out_features = codes_kn.shape
    spec = QuantSpec("int4-asym", group_size, "fp16")
    # packed from the transposed view: a contiguous (N, K) copy of the codes would add
    # a byte per parameter to the peak
    parts = {"qweight": layout.pack_int4(codes_kn.t()).contiguous(),
             "scales": scales_gn.t().contiguous(),
             "zeros": zeros_gn.t().contiguous().to(torch.uint8)}
    return QuantizedWeight.from_parts(parts, spec, out_features, in_features)
