"""Per-group scale search: the grid point that loses least, instead of round-to-nearest.

Round-to-nearest (quantize.py) takes each group's full range, so one outlier stretches the
step for all 64 or 128 elements. Here every group tries a shrinking range (the clipping
ratio of AWQ's ``auto_clip``, and of llama.cpp's scale search), keeps the candidate with
the smallest (optionally importance-weighted) squared error, then re-fits the scale by
weighted least squares on the chosen codes (one alternating step, as in HQQ). The output
is an ordinary QuantizedWeight: same layout, same kernels.

Importance is one non-negative weight per input channel, e.g. the mean squared
activation entering that channel (a diagonal approximation of the layer's output error);
None weighs every element equally (calibration-free).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import ConfigError, QuantizationError
from . import layout
from .layout import QuantSpec
from .quantize import CHUNK_ELEMENTS, QuantizedWeight, check_finite, grouped


@dataclass(frozen=True)
class SearchSettings:
    """The grid of ranges each group tries."""

    steps: int = 20  # candidate ranges between the full range and min_ratio of it
    min_ratio: float = 0.5  # the narrowest range tried, as a share of the full range
    refit: bool = True  # re-fit the chosen scale by least squares on the chosen codes

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"the scale search needs at least 1 step, got {self.steps}")
        if not 0.0 < self.min_ratio <= 1.0:
            raise ConfigError(f"min_ratio must be in (0, 1], got {self.min_ratio}")

    def ratios(self) -> list:
        if self.steps == 1:
            return [1.0]
        step = (1.0 - self.min_ratio) / (self.steps - 1)
        return [1.0 - i * step for i in range(self.steps)]


def search_quantize(weight: torch.Tensor, spec: QuantSpec,
                    importance: Optional[torch.Tensor] = None,
                    settings: SearchSettings = SearchSettings(),
                    name: str = "<tensor>") -> QuantizedWeight:
    """Quantize (N, K) ``weight`` like quantize_weight, choosing each group's range by search.

    ``importance``: None or a (K,) non-negative weight per input channel.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise QuantizationError(f"tensor {name!r}: expected a 2-D float weight, got "
                                f"{tuple(weight.shape)} {weight.dtype}")
    check_finite(name, weight)
    out_features, in_features = weight.shape
    groups_importance = _grouped_importance(importance, spec, in_features, name)
    rows_per_chunk = max(1, CHUNK_ELEMENTS // (spec.padded_in(in_features) * 4))
    parts = [
        _search_rows(grouped(weight[start: start + rows_per_chunk], spec), spec,
                     groups_importance, settings)
        for start in range(0, out_features, rows_per_chunk)
    ]
    qweight, scales, zeros = (
        torch.cat([part[i] for part in parts]) if parts[0][i] is not None else None
        for i in range(3)
    )
    return QuantizedWeight(qweight, scales, zeros, spec, out_features, in_features)


def _grouped_importance(importance, spec: QuantSpec, in_features: int, name: str):
    """(G, gs) float32 weights; padding gets zero weight (its error never matters)."""
    if importance is None:
        importance = torch.ones(in_features)
    if importance.shape != (in_features,):
        raise QuantizationError(f"tensor {name!r}: importance has shape "
                                f"{tuple(importance.shape)}, expected ({in_features},)")
    importance = importance.to(torch.float32)
    if not torch.isfinite(importance).all() or bool((importance < 0).any()):
        raise QuantizationError(f"tensor {name!r}: importance must be finite and >= 0")
    padded = torch.nn.functional.pad(importance, (0, spec.padded_in(in_features) - in_features))
    return padded.reshape(-1, spec.group_size)


def _search_rows(groups: torch.Tensor, spec: QuantSpec, importance: torch.Tensor,
                 settings: SearchSettings):
    """(qweight, scales, zeros-or-None) for a block of rows, groups (R, G, gs)."""
    importance = importance.to(groups.device)
    best = None
    for ratio in settings.ratios():
        scale, zero = _candidate_grid(groups, spec, ratio)
        best = _keep_better(best, _evaluate(groups, importance, spec, scale, zero))
    if settings.refit:
        scale = _least_squares_scale(groups, importance, best)
        best = _keep_better(best, _evaluate(groups, importance, spec, scale, best.zero))
    return _pack(best, spec)


@dataclass
class _Candidate:
    scale: torch.Tensor  # (R, G) bf16
    zero: Optional[torch.Tensor]  # (R, G) float32 integer codes, or None (symmetric)
    values: torch.Tensor  # (R, G, gs) float32 integer codes (value + zero)
    error: torch.Tensor  # (R, G) weighted squared error


def _candidate_grid(groups: torch.Tensor, spec: QuantSpec, ratio: float):
    """(bf16 scale, zero or None) of the range shrunk to ``ratio`` of the full one."""
    if spec.has_zeros:
        low = groups.amin(dim=-1).clamp(max=0.0) * ratio
        high = groups.amax(dim=-1).clamp(min=0.0) * ratio
        span = (high - low) / layout.INT4_CODE_MAX
        scale = torch.where(span > 0, span, torch.ones_like(span)).to(layout.SCALE_DTYPE)
        zero = torch.round(-low / scale.to(torch.float32)).clamp_(0, layout.INT4_CODE_MAX)
        return scale, zero
    qmax = _symmetric_max(spec)
    absmax = groups.abs().amax(dim=-1) * ratio / qmax
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax)).to(layout.SCALE_DTYPE)
    return scale, None


def _symmetric_max(spec: QuantSpec) -> int:
    return layout.INT8_MAX if spec.scheme == "int8" else layout.INT4_SYMMETRIC_MAX


def _evaluate(groups, importance, spec: QuantSpec, scale, zero) -> _Candidate:
    """Codes of ``groups`` on the grid (scale, zero) and their weighted squared error."""
    scale_f32 = scale.to(torch.float32).unsqueeze(-1)
    if zero is None:
        qmax = _symmetric_max(spec)
        values = torch.round(groups / scale_f32).clamp_(-qmax, qmax)
        restored = values * scale_f32
    else:
        offset = zero.unsqueeze(-1)
        values = (torch.round(groups / scale_f32) + offset).clamp_(0, layout.INT4_CODE_MAX)
        restored = (values - offset) * scale_f32
    error = ((restored - groups).square_() * importance).sum(dim=-1)
    return _Candidate(scale, zero, values, error)


def _keep_better(best: Optional[_Candidate], new: _Candidate) -> _Candidate:
    if best is None:
        return new
    better = new.error < best.error  # (R, G)
    return _Candidate(
        torch.where(better, new.scale, best.scale),
        None if new.zero is None else torch.where(better, new.zero, best.zero),
        torch.where(better.unsqueeze(-1), new.values, best.values),
        torch.where(better, new.error, best.error),
    )


def _least_squares_scale(groups, importance, best: _Candidate) -> torch.Tensor:
    """argmin_s sum(imp * (w - s * (q - z))^2) with the codes held fixed, in bf16."""
    steps = best.values if best.zero is None else best.values - best.zero.unsqueeze(-1)
    numerator = (importance * steps * groups).sum(dim=-1)
    denominator = (importance * steps.square()).sum(dim=-1)
    fitted = numerator / denominator.clamp(min=1e-20)
    usable = (denominator > 0) & (fitted > 0)
    return torch.where(usable, fitted, best.scale.to(torch.float32)).to(layout.SCALE_DTYPE)


def _pack(best: _Candidate, spec: QuantSpec):
    rows = best.values.shape[0]
    values = best.values.reshape(rows, -1)
    if spec.scheme == "int8":
        return values.to(torch.int8), best.scale, None
    if best.zero is None:
        codes = values + layout.INT4_SYMMETRIC_OFFSET
        return layout.pack_int4(codes), best.scale, None
    return layout.pack_int4(values), best.scale, best.zero.to(torch.uint8)
