"""CPU matrix-vector path for int4 and int8 linears: our own C++ kernel (``cpu_gemv.cpp``).

It reads the weight where the layout stores it (qweight nibbles, scales and zeros or
minimums, :mod:`..quant.layout`): nothing is prepacked. For 1 to :data:`MAX_ROWS` rows of
x (bfloat16 or float32) it computes, per output row and group g,
``s_g * dot(code - 8, x_g) + off_g * sum(x_g)`` with off = 0 (int4), (8 - z) * s
(int4-asym) or m + 8 * s (int4-min): the dequantized value ``(code - 8) * s + off`` equals
the layout's definition in real numbers. Codes are widened to float32 with AVX2 and
multiplied into float32 accumulators (one pair per group), the output is rounded once into
x's dtype as F.linear does; ``selfcheck.error_bound`` holds it to the reference.
int8 weights (Q8_0's form: ``code * s``, one scale per group) are widened the same way and
accumulated per group; torch has no CPU kernel for group-wise int8 (``_weight_int8pack_mm``
takes one scale per row), so without this one an int8 linear is dequantized on every call.

The extension is compiled with ``torch.utils.cpp_extension.load_inline`` the first time
:func:`available` is asked (never at import), with ``-mavx2 -mfma -mf16c`` only on a CPU
that has them (else the plain C++ loop), and cached by torch under TORCH_EXTENSIONS_DIR.
A failed build (no compiler, no ninja) logs one warning and the gateway keeps torch's op.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from ..quant.quantize import QuantizedWeight

logger = logging.getLogger(__name__)

INT4_SCHEMES = ("int4", "int4-asym", "int4-min")
SCHEMES = INT4_SCHEMES + ("int8",)
GROUP_SIZES = (32, 64, 128, 256)  # multiples of the kernel's 32-element chunk
DTYPES = (torch.bfloat16, torch.float32)
MAX_ROWS = 4  # rows of x the kernel takes; more (prefill) go elsewhere
SOURCE = Path(__file__).with_name("cpu_gemv.cpp")
# built into the same extension, so one build (and one notice) serves both
DECODE_SOURCE = Path(__file__).with_name("cpu_decode.cpp")
DECODE_FUNCTIONS = ("rms_norm", "rope", "silu_mul", "decode_attention", "layer_qkv", "layer_rest")
_VECTOR_FLAGS = ("avx2", "fma", "f16c")
NOTICE_AFTER_S = 2.0  # a build still running after this is a real compile: say so

_lock = threading.Lock()
_module = None  # the built extension once loaded
_failed = False  # a build failed: never try again in this process


def cpu_flags() -> set:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def build_flags() -> list:
    """-O3, plus the vector flags when torch and the CPU both say AVX2 (with FMA, F16C)."""
    flags = ["-O3", "-fopenmp"]
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512") and set(_VECTOR_FLAGS) <= cpu_flags():
        flags += ["-m" + flag for flag in _VECTOR_FLAGS]
    return flags


def ninja_on_path() -> None:
    """Put the ninja wheel's binary on PATH: torch's extension builder runs ``ninja`` from
    PATH, where a venv that is not activated (``.venv/bin/offload-engine``) leaves it out."""
    try:
        import ninja
    except ImportError:
        return  # a system ninja, or none: torch says which
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join(p for p in (ninja.BIN_DIR, path) if p)


def _build():
    from torch.utils import cpp_extension

    ninja_on_path()
    flags = build_flags()
    name = "offload_engine_cpu_gemv_" + ("avx2" if "-mavx2" in flags else "plain")
    start = time.perf_counter()
    # a cached build loads in well under a second; a real one takes about a minute on two
    # cores, which the user should not mistake for a hang
    notice = threading.Timer(NOTICE_AFTER_S, logger.warning, (
        "building the CPU kernels (int4/int8 GEMV, decode steps; once per machine, cached by "
        "torch; about a minute on 2 cores)",))
    notice.start()
    try:
        module = cpp_extension.load_inline(
            name=name, cpp_sources=[SOURCE.read_text(), DECODE_SOURCE.read_text()],
            functions=["gemv", "gemv_int8", "vectorized_build", *DECODE_FUNCTIONS],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"], verbose=False)
    finally:
        notice.cancel()
    logger.info("CPU kernels %s ready in %.1f s (flags %s; cached by torch)",
                name, time.perf_counter() - start, " ".join(flags))
    return module


_builder: Callable = _build  # tests replace it to simulate a failing build


def load():
    """The built extension, or None when it cannot be built here (logged once)."""
    global _module, _failed
    if _module is not None or _failed:
        return _module
    with _lock:
        if _module is None and not _failed:
            try:
                _module = _builder()
            except Exception as exc:  # noqa: BLE001 - any build error means: use torch's op
                _failed = True
                logger.warning("CPU kernels could not be built (%s: %s); int4 linears keep "
                               "torch's kernel, int8 ones the reference, decode steps "
                               "transformers' code (slower)",
                               type(exc).__name__, exc)
    return _module


def available() -> bool:
    """Whether the kernel is built (building it on the first call)."""
    return load() is not None


def reset() -> None:
    """Forget the loaded module and any failure (tests)."""
    global _module, _failed
    with _lock:
        _module, _failed = None, False


def supports(weight: QuantizedWeight) -> bool:
    """Whether the kernel reads this weight's layout (scheme, group size, CPU, contiguous)."""
    spec = weight.spec
    return (spec.scheme in SCHEMES and spec.group_size in GROUP_SIZES
            and weight.qweight.device.type == "cpu"
            and all(t.is_contiguous() for t in weight.components().values()))


def reads(x: torch.Tensor, weight: QuantizedWeight) -> bool:
    """Whether the kernel takes this input and weight (nothing is built to answer)."""
    if x.device.type != "cpu" or x.dtype not in DTYPES or x.numel() == 0:
        return False
    rows = x.numel() // x.shape[-1]
    return rows <= MAX_ROWS and supports(weight)


def accepts(x: torch.Tensor, weight: QuantizedWeight) -> bool:
    """Whether :func:`gemv_linear` runs this input (builds the kernel on first ask)."""
    return reads(x, weight) and available()


def built() -> bool:
    """Whether the kernel is built in this process (never builds: safe while tracing)."""
    return _module is not None


def gemv_linear(x: torch.Tensor, weight: QuantizedWeight, bias: Optional[torch.Tensor] = None,
                vectorized: bool = True) -> torch.Tensor:
    """y = x @ dequant(W).T + bias for x (..., K) with at most MAX_ROWS rows;
    ``vectorized=False`` runs the plain C++ loop (tests)."""
    module = _module if _module is not None else load()
    if module is None:
        raise RuntimeError("the CPU int4/int8 GEMV kernel is not built here: see the log")
    spec = weight.spec
    if spec.scheme not in SCHEMES:  # the rest is checked by the C++ (cheaply)
        raise ValueError(f"scheme {spec.scheme} g{spec.group_size} is not read by the CPU "
                         "GEMV kernel")
    x = x if x.is_contiguous() else x.contiguous()
    if spec.scheme == "int8":  # a registered op: a --compile graph calls it as one node
        return torch.ops.offload_engine.cpu_gemv_int8(x, weight.qweight, weight.scales, bias,
                                                      spec.group_size, vectorized)
    return module.gemv(x, weight.qweight,
                       weight.scales, weight.zeros, weight.mins, bias, spec.group_size,
                       vectorized)


@torch.library.custom_op("offload_engine::cpu_gemv_int8", mutates_args=())
def _gemv_int8_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                  bias: Optional[torch.Tensor], group_size: int,
                  vectorized: bool) -> torch.Tensor:
    """The int8 kernel as a torch op: dynamo keeps it opaque, so a compiled step whose
    weights are constants (runtime/compile_step.py) runs it instead of tracing the
    reference's dequantization of the whole matrix into every step."""
    module = load()
    if module is None:
        raise RuntimeError("the CPU int4/int8 GEMV kernel is not built here: see the log")
    return module.gemv_int8(x, qweight, scales, bias, group_size, vectorized)


@_gemv_int8_op.register_fake
def _(x, qweight, scales, bias, group_size, vectorized):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))
