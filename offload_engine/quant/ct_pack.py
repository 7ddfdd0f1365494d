"""compressed-tensors ``pack-quantized`` int4 weights mapped onto our layout, as pure
functions (no I/O).

The layout (compressed-tensors ``compressors/pack_quantized``, v0.20):

- ``weight_packed``: int32 (N, ceil(K / 8)); element i of a row sits at bits 4i..4i+3
  of the row's bit stream, word by word, little end first. The 4-bit field holds the
  signed value q (-8..7) plus 8.
- ``weight_scale``: (N, groups) in the model dtype (bf16 or fp16); ``group`` strategy:
  groups = K / group_size; ``channel`` strategy: one scale per row, (N, 1).
- ``weight_zero_point`` (asymmetric only): int32 (ceil(N / 8), groups), the signed zero
  points packed the same way but along the output dimension (dim 0).
- ``weight_shape``: int64 [N, K].
- value = (q - zero_point) * scale, computed in the scale dtype.

Read as bytes on a little-endian machine, one int32 word holds elements 2j (low nibble)
and 2j + 1 (high nibble) of byte j: exactly our nibble order (:mod:`.layout`), so the
codes are copied byte for byte. q + 8 is our int4 code (symmetric value code - 8), and
zero_point + 8 our zero point code, so (code - zero) = (q - zero_point): no value changes.
A ``channel`` scale is repeated over the groups of a row, which is exact too (it costs
bytes, not precision).
"""

from __future__ import annotations

import sys

import torch

from ..errors import QuantizationError
from . import layout
from .layout import QuantSpec
from .quantize import QuantizedWeight

NIBBLES_PER_WORD = 8
SIGNED_OFFSET = 8  # q + 8 is the stored 4-bit field, and our code
INT8_OFFSET = 128  # 8-bit pack-quantized stores value + 128
EXPORT_SCHEMES = ("int4", "int4-asym", "int8")
SCALE_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def _check_little_endian() -> None:
    if sys.byteorder != "little":
        raise QuantizationError("compressed-tensors int4 import needs a little-endian host")


def unpack_codes(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """int32 (R, ceil(C / 8)) packed along dim 1 -> uint8 codes (R, C) (q + 8)."""
    _check_little_endian()
    as_bytes = packed.contiguous().view(torch.uint8)  # (R, words * 4)
    return layout.unpack_int4(as_bytes)[:, :columns]


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (R, C) -> int32 (R, ceil(C / 8)); padding nibbles are 0."""
    _check_little_endian()
    rows, columns = codes.shape
    padded = -(-columns // NIBBLES_PER_WORD) * NIBBLES_PER_WORD
    if padded != columns:
        codes = torch.nn.functional.pad(codes.to(torch.uint8), (0, padded - columns))
    return layout.pack_int4(codes).contiguous().view(torch.int32)


def channel_group_size(in_features) -> int:
    """The group size per-row (``channel``) scales are repeated over: the largest of ours
    that divides the K of every linear (one model holds one group size; no padding)."""
    for size in sorted(layout.GROUP_SIZES, reverse=True):
        if all(k % size == 0 for k in in_features):
            return size
    raise QuantizationError(f"input sizes {sorted(set(in_features))} have no common group "
                            f"size among ours ({', '.join(map(str, layout.GROUP_SIZES))})")


def import_weight(packed: torch.Tensor, scale: torch.Tensor, zero_point, shape,
                  group_size: int, channel: bool = False,
                  name: str = "<tensor>") -> QuantizedWeight:
    """Our QuantizedWeight of one pack-quantized int4 weight.

    ``zero_point`` is the packed int32 tensor or None (symmetric); ``group_size`` is the
    config's, or for the ``channel`` strategy (``channel``) the group size its one scale
    per row is repeated over (:func:`channel_group_size`).
    """
    out_features, in_features = (int(d) for d in shape)
    scale_name = SCALE_DTYPE_NAMES.get(scale.dtype)
    if scale_name is None:
        raise QuantizationError(f"tensor {name!r}: scales are {scale.dtype}; only bf16 and "
                                "fp16 scales can be held exactly")
    size = int(group_size)
    if size not in layout.GROUP_SIZES or in_features % size:
        raise QuantizationError(f"tensor {name!r}: group size {size} with in_features "
                                f"{in_features} has no exact import (we hold groups of "
                                f"{', '.join(map(str, layout.GROUP_SIZES))} dividing K)")
    groups = in_features // size
    expected_scale = (out_features, 1 if channel else groups)
    words = -(-in_features // NIBBLES_PER_WORD)
    if tuple(scale.shape) != expected_scale or tuple(packed.shape) != (out_features, words):
        raise QuantizationError(f"tensor {name!r}: weight_packed {tuple(packed.shape)} / "
                                f"weight_scale {tuple(scale.shape)} do not fit shape "
                                f"{[out_features, in_features]}; is the checkpoint damaged?")
    codes = unpack_codes(packed, in_features)
    spec = QuantSpec("int4" if zero_point is None else "int4-asym", size, scale_name)
    zeros = None
    if zero_point is not None:
        zeros = unpack_codes(zero_point.t(), out_features).t()  # (N, 1 or groups)
        zeros = zeros.expand(out_features, groups).contiguous() if channel else zeros
    scales = scale.expand(out_features, groups) if channel else scale
    return QuantizedWeight(layout.pack_int4(codes), scales.contiguous(),
                           None if zeros is None else zeros.contiguous(), spec,
                           out_features, in_features)


def pack_int8_values(values: torch.Tensor) -> torch.Tensor:
    """int8 values (R, C) -> int32 (R, ceil(C / 4)): 8-bit pack-quantized stores value + 128
    at bits 8i..8i+7 of the row's bit stream, i.e. byte i of a little-endian row."""
    _check_little_endian()
    rows, columns = values.shape
    biased = (values.to(torch.int16) + INT8_OFFSET).to(torch.uint8)
    padded = -(-columns // 4) * 4
    if padded != columns:
        biased = torch.nn.functional.pad(biased, (0, padded - columns))
    return biased.contiguous().view(torch.int32)


def export_weight(weight: QuantizedWeight, name: str = "<tensor>") -> dict:
    """The pack-quantized tensors (without the module prefix) of one of our weights:
    int4 and int4-asym as 4-bit, int8 (symmetric) as 8-bit pack-quantized."""
    spec = weight.spec
    if spec.scheme not in EXPORT_SCHEMES:
        raise QuantizationError(
            f"tensor {name!r}: scheme {spec.scheme} has no compressed-tensors form (its "
            "float minimum per group is no integer zero point); exportable schemes: "
            f"{', '.join(EXPORT_SCHEMES)}")
    if weight.in_features % spec.group_size:
        raise QuantizationError(
            f"tensor {name!r}: in_features {weight.in_features} is not a multiple of the "
            f"group size {spec.group_size}; compressed-tensors (and vLLM) need whole groups. "
            "Quantize with a --group-size that divides it")
    if spec.bits == 8:
        packed = pack_int8_values(weight.qweight[:, :weight.in_features])
    else:
        packed = pack_codes(layout.unpack_int4(weight.qweight)[:, :weight.in_features])
    tensors = {
        "weight_packed": packed,
        "weight_scale": weight.scales.contiguous(),
        "weight_shape": torch.tensor([weight.out_features, weight.in_features],
                                     dtype=torch.int64),
    }
    if weight.zeros is not None:
        tensors["weight_zero_point"] = pack_codes(weight.zeros.t().contiguous()).t().contiguous()
    return tensors
