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

from ..quant import block_formats, layout
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
    scale_dtype: str = "bf16"  # "fp16": the scales of imported checkpoints

    @property
    def label(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        return (f"{self.path} {self.scheme} g{self.group_size} {self.scale_dtype} "
                f"N={self.out_features} K={self.in_features} M={self.rows} {dtype}")


def random_weight(spec: QuantSpec, out_features: int, in_features: int,
                  gen: torch.Generator) -> QuantizedWeight:
    """Random codes, scales and offsets in every code's range: what an imported checkpoint
    may hold, not only what our quantizer would choose. Raw-block schemes get random
    blocks (in_features a whole number of them)."""
    if spec.raw_blocks:
        rows = block_formats.random_rows(spec.block_format, out_features, in_features, gen)
        return QuantizedWeight.from_parts({"qweight": rows}, spec, out_features, in_features)
    shapes = spec.component_shapes(out_features, in_features)
    parts = {}
    for name, (shape, dtype) in shapes.items():
        if name == "qweight" and spec.bits == 8:
            parts[name] = torch.randint(-128, 128, shape, generator=gen).to(dtype)
        elif name in ("qweight", "zeros"):
            high = 256 if name == "qweight" else layout.INT4_CODE_MAX + 1
            parts[name] = torch.randint(0, high, shape, generator=gen).to(dtype)
        else:  # scales positive, minimums about -8 scales as Q4_1 writes them
            parts[name] = (torch.rand(shape, generator=gen) * 0.1 + 0.01) * (
                -8 if name == "mins" else 1)
            parts[name] = parts[name].to(dtype)
    return QuantizedWeight.from_parts(parts, spec, out_features, in_features)


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
    spec = QuantSpec(case.scheme, case.group_size, case.scale_dtype)
    if spec.scheme in layout.SCHEMES and spec.scale_dtype == layout.DEFAULT_SCALE_DTYPE:
        dense = torch.randn(case.out_features, case.in_features, generator=gen)
        weight = quantize_weight(dense, spec)
    else:
        weight = random_weight(spec, case.out_features, case.in_features, gen)
    x = torch.randn(case.rows, case.in_features, generator=gen).to(case.dtype)
    bias = torch.randn(case.out_features, generator=gen).to(case.dtype) if case.bias else None
    weight = QuantizedWeight.from_parts(
        {name: part.to(device) for name, part in weight.components().items()},
        spec, weight.out_features, weight.in_features)
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
