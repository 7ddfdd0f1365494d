"""Activation-aware weight scaling (AWQ, Lin et al. 2023), as pure functions.

A linear's output is unchanged when its input channel k is divided by s_k and its weight
column k multiplied by s_k. Quantizing W * s instead of W gives the channels that see
large activations a finer effective grid. AWQ searches s = mean|x|^alpha over alpha in
[0, 1) and keeps the alpha whose quantized output is closest to the unquantized one on
calibration inputs. The division of x by s is folded into whatever produced x (a norm's
weight, or the rows of the previous linear); that folding lives in the calibration
driver, not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List

import torch

from ..errors import ConfigError, QuantizationError

# quantize-then-dequantize of an (N, K) float32 weight, e.g. round-to-nearest
FakeQuantizer = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ScaleSearchSettings:
    """The alphas tried for one group of linears sharing an input."""

    grid: int = 20  # alphas 0, 1/grid, ..., (grid-1)/grid, as in the AWQ reference code

    def __post_init__(self) -> None:
        if self.grid < 1:
            raise ConfigError(f"the AWQ scale grid needs at least 1 point, got {self.grid}")

    def alphas(self) -> list:
        return [i / self.grid for i in range(self.grid)]


@dataclass
class ScaleSearchResult:
    """The chosen per-input-channel scale and what it bought."""

    scales: torch.Tensor  # (K,) float32; multiply weight columns, divide inputs
    alpha: float
    error: float  # mean squared output error with the chosen scales
    baseline_error: float  # the same with no scaling (alpha 0)


def scales_for(activation_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^alpha, normalised so that max(s) * min(s) = 1 (AWQ's normalisation)."""
    scales = activation_mean.to(torch.float32).clamp(min=1e-4).pow(alpha)
    return scales / (scales.max() * scales.min()).sqrt()


def search_scales(inputs: torch.Tensor, activation_mean: torch.Tensor,
                  weights: List[torch.Tensor], fake_quantize: FakeQuantizer,
                  settings: ScaleSearchSettings = ScaleSearchSettings()) -> ScaleSearchResult:
    """The alpha whose scaled-and-quantized weights best reproduce ``inputs @ W.T``.

    inputs: (T, K) calibration inputs shared by ``weights`` (each (N_i, K)), float32.
    activation_mean: (K,) mean |x| per channel over all calibration tokens.
    Biases are left out: they are not quantized and cancel in the difference.
    """
    in_features = inputs.shape[1]
    if activation_mean.shape != (in_features,):
        raise QuantizationError(f"activation mean has shape {tuple(activation_mean.shape)}, "
                                f"expected ({in_features},)")
    for weight in weights:
        if weight.dim() != 2 or weight.shape[1] != in_features:
            raise QuantizationError(f"weight of shape {tuple(weight.shape)} does not take "
                                    f"{in_features} inputs")
    stacked = torch.cat([w.to(torch.float32) for w in weights])  # (sum N_i, K)
    output_error = _output_error(inputs.to(torch.float32))
    best = None
    baseline = None
    for alpha in settings.alphas():
        scales = scales_for(activation_mean, alpha)
        restored = fake_quantize(stacked * scales) / scales
        error = output_error(restored - stacked)
        if baseline is None:
            baseline = error
        if best is None or error < best.error:
            best = ScaleSearchResult(scales, alpha, error, baseline)
    best.baseline_error = baseline
    return best


def _output_error(inputs: torch.Tensor) -> Callable[[torch.Tensor], float]:
    """mean((X @ D.T)^2) for a weight difference D, by the cheaper of two exact routes.

    With more tokens T than inputs K, X^T X (K, K) is formed once and each candidate
    costs N*K*K instead of T*K*N.
    """
    tokens, in_features = inputs.shape
    if tokens <= in_features:
        return lambda diff: float((inputs @ diff.T).square().mean())
    gram = inputs.T @ inputs  # (K, K)
    return lambda diff: float(((diff @ gram) * diff).sum() / (tokens * diff.shape[0]))
