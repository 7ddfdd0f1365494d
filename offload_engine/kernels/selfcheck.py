"""Checking a kernel path against the reference, with an error bound that is derived,
not tuned. Used by the tests and by ``tools/bench_kernels.py --check``.

The reference computes y = x @ W_d.T + bias where W_d = dequantize_weight(W, x.dtype)
is the dequantized weight rounded (to nearest) into x's dtype. A kernel may differ by

- rounding W_d differently (Triton's interpreter truncates fp32 -> bf16): less than
  eps * |x| @ |W_d|.T;
- rounding the output into x's dtype: less than eps * |y|;
- float32 accumulation in another order: less than K * eps32 * |x| @ |W_d|.T;

so the bound per element is eps * (|y| + mag) + K * eps32 * mag with
mag = |x| @ |W_d|.T + |bias| and eps the machine epsilon of x's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..quant.layout import QuantSpec
from ..quant.quantize import QuantizedWeight, dequantize_weight, quantize_weight
from . import gateway


@dataclass(frozen=True)
class Case:
    """One kernel run to check."""

    path: str  # one of gateway.PATHS
    scheme: str  # quantization scheme
    group_size: int  # elements per scale
    out_features: int  # N
    in_features: int  # K (unpadded)
    rows: int  # M, flattened rows of x
    dtype: torch.dtype  # activation dtype
    bias: bool = True  # add a bias vector

    @property
    def label(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        return (f"{self.path} {self.scheme} g{self.group_size} N={self.out_features} "
                f"K={self.in_features} M={self.rows} {dtype}")


@dataclass(frozen=True)
class CaseResult:
    """How far a kernel's output is from the exact reference result."""

    case: Case
    max_abs_err: float  # largest |y - exact| over the output
    tolerance: float  # the bound at the element where err / bound is largest
    worst_ratio: float  # max of err / bound: at most 1 passes

    @property
    def ok(self) -> bool:
        return self.worst_ratio <= 1.0


def make_inputs(case: Case, device: torch.device, seed: int = 0):
    """Seeded (x, quantized weight, bias) for a case, built on CPU then moved."""
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(case.out_features, case.in_features, generator=gen)
    weight = quantize_weight(dense, QuantSpec(case.scheme, case.group_size))
    x = torch.randn(case.rows, case.in_features, generator=gen).to(case.dtype)
    bias = torch.randn(case.out_features, generator=gen).to(case.dtype) if case.bias else None
    weight = QuantizedWeight(
        qweight=weight.qweight.to(device),
        scales=weight.scales.to(device),
        zeros=None if weight.zeros is None else weight.zeros.to(device),
        spec=weight.spec,
        out_features=weight.out_features,
        in_features=weight.in_features,
    )
    return x.to(device), weight, None if bias is None else bias.to(device)


def error_bound(x: torch.Tensor, weight: QuantizedWeight, bias: Optional[torch.Tensor]):
    """(exact float64 result, per-element bound) of x @ dequant(W).T + bias."""
    dense = dequantize_weight(weight, dtype=x.dtype).double()  # (N, K)
    x64 = x.reshape(-1, weight.in_features).double()  # (M, K)
    exact = x64 @ dense.T
    mag = x64.abs() @ dense.abs().T
    if bias is not None:
        exact = exact + bias.double()
        mag = mag + bias.double().abs()
    eps = torch.finfo(x.dtype).eps
    eps32 = torch.finfo(torch.float32).eps
    bound = eps * (exact.abs() + mag) + weight.in_features * eps32 * mag
    return exact, bound + torch.finfo(torch.float32).tiny


def compare(case: Case, y: torch.Tensor, x: torch.Tensor, weight, bias) -> CaseResult:
    """Score a kernel output against the bound."""
    n_out = weight.out_features
    if y.dtype != x.dtype or tuple(y.shape) != (*x.shape[:-1], n_out):
        raise AssertionError(f"{case.label}: got {tuple(y.shape)} {y.dtype}")
    exact, bound = error_bound(x, weight, bias)
    err = (y.reshape(-1, n_out).double() - exact).abs()
    err = torch.where(torch.isfinite(err), err, torch.full_like(err, float("inf")))
    ratio = err / bound
    worst = int(torch.argmax(ratio))
    return CaseResult(
        case=case,
        max_abs_err=float(err.max()),
        tolerance=float(bound.flatten()[worst]),
        worst_ratio=float(ratio.flatten()[worst]),
    )


def run_case(case: Case, device: torch.device, seed: int = 0) -> CaseResult:
    """Run one case through its path and compare it with the exact reference."""
    x, weight, bias = make_inputs(case, device, seed)
    y = gateway.run_path(case.path, x, weight, bias)
    return compare(case, y, x, weight, bias)
