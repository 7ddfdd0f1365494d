"""The one place that chooses which kernel runs a quantized linear.

Callers never import a kernel directly: they call :func:`quantized_linear`, and
the choice is made here alone:

- ``"reference"``: the pure-torch reference, when forced, when triton is not installed
  (CUDA) or the weight is not prepacked (CPU), or for activation dtypes the kernels do
  not take;
- ``"cpu-int4pack"``: torch's packed int4 CPU matmul (:mod:`.cpu_int4`), for bfloat16 x
  on CPU and a weight prepacked at load (schemes int4, int4-asym, int4-min);
- ``"cpu-gemv"``: our C++ int4 matrix-vector kernel (:mod:`.cpu_gemv`), for one row of x
  where ``cpu-int4pack`` would run (bfloat16, prepacked weight), once it is built (on the
  first such call; a failed build keeps ``cpu-int4pack``). It reads the stored components;
  at one row it measured 1.5-2x torch's op on SmolLM2's shapes, at 4 rows 1.1-1.8x and on
  4096x4096 no faster, so prefill and multi-row steps stay on torch's op
  (docs/performance.md). A --compile graph keeps torch's op (the extension is not a torch
  op dynamo can trace). For int4 opt-in (OFFLOAD_CPU_GEMV=1): end to end on the demo it
  measured no faster than torch's op (tools/cpu_ab.py --switch cpu-gemv), and its first build takes
  ~a minute. For int8 weights (a GGUF's Q8_0 output matrix) it is the default for 1-4
  rows of x: torch has no group-wise int8 CPU kernel, and the reference dequantizes the
  whole matrix on every call (OFFLOAD_CPU_GEMV=0 turns both off); the int8 kernel is a
  registered op (``offload_engine::cpu_gemv_int8``), so a --compile graph runs it too;
- ``"triton-gemv"``: the fused decode kernel, for at most 16 rows of x;
- ``"triton-dequant-matmul"``: Triton dequantization into scratch plus torch.matmul.

Triton is imported lazily, the first time a Triton path runs; nothing compiles at import.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from typing import Callable, Optional

import torch

from ..quant.quantize import QuantizedWeight
from . import cpu_gemv, cpu_int4
from .reference import quantized_linear_reference

logger = logging.getLogger(__name__)

REFERENCE = "reference"
TRITON_GEMV = "triton-gemv"
TRITON_DEQUANT_MATMUL = "triton-dequant-matmul"
CPU_INT4PACK = "cpu-int4pack"
CPU_GEMV = "cpu-gemv"
PATHS = (REFERENCE, TRITON_GEMV, TRITON_DEQUANT_MATMUL, CPU_INT4PACK, CPU_GEMV)

GEMV_MAX_ROWS = 16  # flattened rows of x up to which the fused decode kernel runs
_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Set OFFLOAD_FORCE_REFERENCE=1 (or call force_reference(True)) to bypass fast kernels.
_force_reference = os.environ.get("OFFLOAD_FORCE_REFERENCE", "") not in ("", "0")
_triton_available: Optional[bool] = None
# OFFLOAD_CPU_GEMV=1 also runs one-row int4 CPU steps through the C++ kernel (built on first
# use; end to end it measured no faster than torch's op: docs/performance.md); unset, only
# int8 weights take it; 0 turns it off.
_cpu_gemv_setting = os.environ.get("OFFLOAD_CPU_GEMV", "")
_cpu_gemv_enabled = _cpu_gemv_setting == "1"
_cpu_gemv_int8 = _cpu_gemv_setting != "0"
CPU_GEMV_MAX_ROWS = 1  # rows of x routed to cpu-gemv (it takes up to cpu_gemv.MAX_ROWS)


def force_reference(enabled: bool) -> None:
    """Route every quantized linear through the pure-torch reference."""
    global _force_reference
    _force_reference = bool(enabled)


def reference_forced() -> bool:
    return _force_reference


def triton_available() -> bool:
    """Whether triton can be imported here (checked once, without importing it)."""
    global _triton_available
    if _triton_available is None:
        _triton_available = importlib.util.find_spec("triton") is not None
        if not _triton_available:
            logger.info("triton is not installed: quantized linears use the torch reference")
    return _triton_available


def kernel_path(x: torch.Tensor, weight: QuantizedWeight) -> str:
    """Which path :func:`quantized_linear` takes for this input and weight."""
    if _force_reference:
        return REFERENCE
    if not x.is_cuda:
        if not cpu_int4.accepts(x, weight):
            return CPU_GEMV if _int8_gemv_takes(x, weight) else REFERENCE
        if (_cpu_gemv_enabled and x.numel() <= CPU_GEMV_MAX_ROWS * x.shape[-1]
                and not torch.compiler.is_compiling()  # a graph keeps torch's op
                and cpu_gemv.accepts(x, weight)):
            return CPU_GEMV
        return CPU_INT4PACK
    if not triton_available():
        return REFERENCE
    if x.dtype not in _TRITON_DTYPES or x.numel() == 0:
        return REFERENCE
    if weight.qweight.device != x.device:
        return REFERENCE
    rows = x.numel() // x.shape[-1]
    return TRITON_GEMV if rows <= GEMV_MAX_ROWS else TRITON_DEQUANT_MATMUL


def _int8_gemv_takes(x: torch.Tensor, weight: QuantizedWeight) -> bool:
    """Whether an int8 weight's CPU step runs in the C++ kernel (building it on first ask;
    a --compile trace takes it when the eager prefill has built it, and never builds)."""
    if not (_cpu_gemv_int8 and weight.spec.scheme == "int8"):
        return False
    if torch.compiler.is_compiling():
        return cpu_gemv.built() and cpu_gemv.reads(x, weight)
    return cpu_gemv.accepts(x, weight)


def prepare_cpu_kernels(weights) -> None:
    """Build our C++ kernel now when int8 ``weights`` will be computed on the CPU: its
    one-time build (about a minute, logged) then happens while the model loads, not inside
    the first token of the first reply."""
    if _cpu_gemv_int8 and any(weight.spec.scheme == "int8" for weight in weights):
        cpu_gemv.available()


def _kernel(path: str) -> Callable:
    """The function behind a path; Triton modules are imported here, on first use."""
    if path == REFERENCE:
        return quantized_linear_reference
    if path == CPU_INT4PACK:
        return cpu_int4.int4pack_linear
    if path == CPU_GEMV:
        return cpu_gemv.gemv_linear
    if path == TRITON_GEMV:
        return importlib.import_module(".triton_gemv", __package__).gemv
    if path == TRITON_DEQUANT_MATMUL:
        return importlib.import_module(".triton_dequant", __package__).dequant_matmul
    raise ValueError(f"unknown kernel path {path!r}: use one of {', '.join(PATHS)}")


def run_path(
    path: str, x: torch.Tensor, weight: QuantizedWeight, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Run one named path regardless of the dispatch rules (tests, tools, benchmarks).

    On CPU the Triton paths need TRITON_INTERPRET=1 set before triton is imported;
    the CPU int4 path prepacks a plain weight on each call (the runtime prepacks at load).
    """
    return _kernel(path)(x, weight, bias)


def prepare_cpu_weight(weight: QuantizedWeight) -> QuantizedWeight:
    """The weight with its CPU kernel form attached, built once at load; unchanged for
    schemes the CPU kernel does not hold (they run through the reference)."""
    return cpu_int4.prepack(weight)


def quantized_linear(
    x: torch.Tensor, weight: QuantizedWeight, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """y = x @ dequant(weight).T + bias for x of shape (..., in_features)."""
    return _kernel(kernel_path(x, weight))(x, weight, bias)
