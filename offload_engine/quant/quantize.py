"""Group-wise quantization and its reference inverse, as pure functions.

The memory layout is defined in :mod:`offload_engine.quant.layout`; this module only
computes codes and scales and hands them to the layout's packers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import QuantizationError
from . import block_formats, layout
from .layout import QuantSpec

# Rows are quantized in blocks of about this many elements so that the float32
# temporaries stay a bounded constant whatever the tensor size.
CHUNK_ELEMENTS = 1 << 20


@dataclass
class QuantizedWeight:
    """One quantized linear weight: its components plus what is needed to read them."""

    # uint8 (N, padded_in/2) for int4, int8 (N, padded_in) for int8, uint8 GGUF block rows
    # for the raw-block schemes (layout.py)
    qweight: torch.Tensor
    scales: Optional[torch.Tensor]  # (N, groups) in spec.scale_dtype; None for raw blocks
    zeros: Optional[torch.Tensor]  # uint8 (N, groups) for int4-asym, else None
    spec: QuantSpec
    out_features: int  # N
    in_features: int  # K, the true (unpadded) input size
    mins: Optional[torch.Tensor] = None  # (N, groups) in spec.scale_dtype for int4-min

    @classmethod
    def from_parts(cls, parts: dict, spec: QuantSpec, out_features: int,
                   in_features: int) -> QuantizedWeight:
        """Rebuild a weight from its components() (a manifest entry, device views)."""
        return cls(parts["qweight"], parts.get("scales"), parts.get("zeros"), spec, out_features,
                   in_features, mins=parts.get("mins"))

    def components(self) -> dict:
        parts = {"qweight": self.qweight}
        if self.scales is not None:
            parts["scales"] = self.scales
        if self.zeros is not None:
            parts["zeros"] = self.zeros
        if self.mins is not None:
            parts["mins"] = self.mins
        return parts

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.components().values())

    def scale_values(self) -> torch.Tensor:
        """Every stored scale (and, for raw blocks, minimum) as float32: what a check for
        non-finite data reads, since codes cannot be non-finite."""
        fmt = self.spec.block_format
        if fmt is not None:
            return block_formats.block_scales(fmt, self.qweight)
        return self.scales.to(torch.float32)


def grouped(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Float32 (N, groups, group_size) view of the zero-padded weight."""
    out_features, in_features = weight.shape
    padded = spec.padded_in(in_features)
    w = weight.to(torch.float32)
    if padded != in_features:
        w = torch.nn.functional.pad(w, (0, padded - in_features))
    return w.reshape(out_features, padded // spec.group_size, spec.group_size)


def _round_scale_up(scale_f32: torch.Tensor, needed: torch.Tensor,
                    dtype: torch.dtype = layout.SCALE_DTYPE) -> torch.Tensor:
    """Store scales in ``dtype`` without ever rounding below ``needed``.

    A scale rounded down would push the largest element past the grid and clip it,
    breaking the half-step error bound.
    """
    scale = scale_f32.to(dtype)
    while True:
        short = scale.to(torch.float32) < needed
        if not short.any():
            return scale
        larger = torch.nextafter(scale, torch.full_like(scale, float("inf")))
        scale = torch.where(short, larger, scale)


def check_finite(name: str, weight: torch.Tensor) -> None:
    if not torch.isfinite(weight).all():
        bad = int((~torch.isfinite(weight)).sum())
        raise QuantizationError(
            f"tensor {name!r} has {bad} non-finite values (NaN or Inf): the source "
            "checkpoint is damaged; re-download or re-export it"
        )


def quantize_weight(weight: torch.Tensor, spec: QuantSpec,
                    name: str = "<tensor>") -> QuantizedWeight:
    """Quantize a 2-D float weight (out_features, in_features) group-wise along dim 1."""
    if weight.dim() != 2:
        raise QuantizationError(
            f"tensor {name!r}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise QuantizationError(f"tensor {name!r}: expected a float weight, got {weight.dtype}")
    # Every stored scheme but the raw GGUF blocks, and fp16 scales, are written too: the
    # linears an import cannot copy (an AWQ/GPTQ float lm_head, a GGUF's F16 output) are
    # quantized here with the imported spec (int4-min for GGUF Q4_1).
    if spec.raw_blocks:
        raise QuantizationError(f"tensor {name!r}: scheme {spec.scheme} holds GGUF blocks as a "
                                "file stores them; it is imported, never quantized here")
    check_finite(name, weight)
    out_features, in_features = weight.shape
    rows_per_chunk = max(1, CHUNK_ELEMENTS // spec.padded_in(in_features))
    parts = [
        _quantize_rows(weight[start : start + rows_per_chunk], spec)
        for start in range(0, out_features, rows_per_chunk)
    ]
    components = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    return QuantizedWeight.from_parts(components, spec, out_features, in_features)


def _quantize_rows(weight: torch.Tensor, spec: QuantSpec) -> dict:
    """Quantize a block of rows: its components (qweight, scales, and zeros or mins)."""
    groups = grouped(weight, spec)  # (rows, G, gs)
    if spec.scheme == "int4-min":
        qweight, scales, mins = _quantize_min(groups, spec.scale_torch_dtype)
        return {"qweight": qweight, "scales": scales, "mins": mins}
    scales, zeros = group_grid(groups, spec)
    zero_codes = None if zeros is None else zeros.unsqueeze(-1)
    codes = grid_codes(groups, scales.to(torch.float32).unsqueeze(-1), zero_codes, spec)
    parts = {"qweight": pack_codes(codes.reshape(groups.shape[0], -1), spec), "scales": scales}
    if zeros is not None:
        parts["zeros"] = zeros.to(torch.uint8)
    return parts


def group_grid(groups: torch.Tensor, spec: QuantSpec):
    """Round-to-nearest grid of each group (..., gs): (scales in the spec's scale dtype,
    float32 zero-point codes or None for the symmetric schemes).

    Symmetric: scale = absmax / qmax. Asymmetric: the range [min, max] widened to include
    0 (so that 0 is exactly representable), 15 steps, an integer zero point.
    """
    dtype = spec.scale_torch_dtype
    if spec.has_zeros:
        low = groups.amin(dim=-1).clamp(max=0.0)
        high = groups.amax(dim=-1).clamp(min=0.0)
        needed = (high - low) / layout.INT4_CODE_MAX
        scales = _round_scale_up(torch.where(needed > 0, needed, torch.ones_like(needed)),
                                 needed, dtype)
        zeros = torch.round(-low / scales.to(torch.float32)).clamp_(0, layout.INT4_CODE_MAX)
        return scales, zeros
    absmax = groups.abs().amax(dim=-1)
    needed = absmax / symmetric_max(spec)
    scales = _round_scale_up(torch.where(absmax > 0, needed, torch.ones_like(needed)), needed,
                             dtype)
    return scales, None


def symmetric_max(spec: QuantSpec) -> int:
    return layout.INT8_MAX if spec.scheme == "int8" else layout.INT4_SYMMETRIC_MAX


def grid_codes(values: torch.Tensor, scales_f32: torch.Tensor, zeros, spec: QuantSpec):
    """Nearest grid codes (float32) of ``values``: value + zero for int4-asym, the signed
    value otherwise. ``scales_f32`` and ``zeros`` broadcast against ``values``."""
    if zeros is None:
        qmax = symmetric_max(spec)
        return torch.round(values / scales_f32).clamp_(-qmax, qmax)
    return (torch.round(values / scales_f32) + zeros).clamp_(0, layout.INT4_CODE_MAX)


def pack_codes(codes: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The stored qweight of (N, padded_in) float codes from grid_codes."""
    if spec.scheme == "int8":
        return codes.to(torch.int8)
    if not spec.has_zeros:
        codes = codes + layout.INT4_SYMMETRIC_OFFSET
    return layout.pack_int4(codes)


def _quantize_min(groups: torch.Tensor, scale_dtype: torch.dtype):
    """int4-min (GGUF Q4_1's form): value = code * scale + min, a float minimum per group.

    The minimum is rounded down to the scale dtype and the scale up, so the grid
    min .. min + 15 * scale still spans the group and no element is clipped: the error
    stays at most half a step, as for the other schemes.
    """
    out_features = groups.shape[0]
    low = groups.amin(dim=-1)  # (N, G)
    mins = low.to(scale_dtype)
    above = mins.to(torch.float32) > low
    mins = torch.where(above, torch.nextafter(mins, torch.full_like(mins, float("-inf"))), mins)
    mins_f32 = mins.to(torch.float32)
    needed = (groups.amax(dim=-1) - mins_f32) / layout.INT4_CODE_MAX
    scales = _round_scale_up(torch.where(needed > 0, needed, torch.ones_like(needed)), needed,
                             scale_dtype)
    codes = torch.round((groups - mins_f32.unsqueeze(-1)) / scales.to(torch.float32).unsqueeze(-1))
    codes = codes.clamp_(0, layout.INT4_CODE_MAX).reshape(out_features, -1)
    return layout.pack_int4(codes), scales, mins


def dequantize_weight(weight: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference dequantizer: the (out_features, in_features) float weight."""
    spec = weight.spec
    out_features = weight.out_features
    if spec.raw_blocks:
        dense = block_formats.dequantize_rows(spec.block_format, weight.qweight,
                                              weight.in_features)
        return dense.to(dtype)
    if spec.bits == 4:
        values = layout.unpack_int4(weight.qweight).to(torch.float32)
        if spec.offset_mode == layout.OFFSET_NONE:
            values = values - layout.INT4_SYMMETRIC_OFFSET
    else:
        values = weight.qweight.to(torch.float32)
    groups = values.reshape(out_features, -1, spec.group_size)
    if weight.zeros is not None:
        groups = groups - weight.zeros.to(torch.float32).unsqueeze(-1)
    dense = groups * weight.scales.to(torch.float32).unsqueeze(-1)
    if weight.mins is not None:  # after the product, as gguf-py rounds it
        dense = dense + weight.mins.to(torch.float32).unsqueeze(-1)
    dense = dense.reshape(out_features, -1)[:, : weight.in_features]
    return dense.to(dtype)
