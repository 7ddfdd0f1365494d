"""Triton kernels against the pure-torch reference.

Without a GPU, conftest.py sets TRITON_INTERPRET=1 and the kernels run in triton's CPU
interpreter, where every program launch costs about a millisecond: shapes stay small.
"""

from types import SimpleNamespace

import pytest
import torch

from offload_engine.kernels import gateway
from offload_engine.kernels.selfcheck import Case, compare, make_inputs, run_case
from offload_engine.quant import block_formats
from offload_engine.quant.layout import QuantSpec
from offload_engine.quant.quantize import dequantize_weight, quantize_weight

pytest.importorskip("triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SCHEMES = ("int4", "int4-asym", "int8")
GROUPS = (32, 128, 256)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
N = 200  # not a multiple of any block size
K = 576  # padded to 640 with group 128 and to 768 with group 256


def assert_ok(result):
    assert result.ok, (
        f"{result.case.label}: max |err| {result.max_abs_err:.3g}, "
        f"err/tol {result.worst_ratio:.3g} (tol {result.tolerance:.3g})"
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_gemv_matches_reference(scheme, group, dtype):
    for rows in (1, 3, 16):
        assert_ok(run_case(Case(gateway.TRITON_GEMV, scheme, group, N, K, rows, dtype), DEVICE))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_dequant_matmul_matches_reference(scheme, group, dtype):
    case = Case(gateway.TRITON_DEQUANT_MATMUL, scheme, group, N, K, 64, dtype)
    assert_ok(run_case(case, DEVICE))


@pytest.mark.parametrize("path", [gateway.TRITON_GEMV, gateway.TRITON_DEQUANT_MATMUL])
@pytest.mark.parametrize(("n_out", "k_in", "group"), [(70, 301, 32), (130, 64, 64), (8, 1000, 256)])
def test_odd_shapes_without_bias(path, n_out, k_in, group):
    case = Case(path, "int4", group, n_out, k_in, 2, torch.float16, bias=False)
    assert_ok(run_case(case, DEVICE, seed=1))


def test_gemv_split_k_partial_sums():
    from offload_engine.kernels.triton_gemv import GemvConfig, gemv

    for rows in (1, 5):
        case = Case(gateway.TRITON_GEMV, "int4-asym", 64, N, K, rows, torch.float16)
        x, weight, bias = make_inputs(case, DEVICE, seed=2)
        y = gemv(x, weight, bias, config=GemvConfig(block_n=64, block_k=128, split_k=3))
        assert_ok(compare(case, y, x, weight, bias))


def test_dequant_matmul_in_row_chunks_reuses_scratch():
    from offload_engine.kernels import triton_dequant

    case = Case(gateway.TRITON_DEQUANT_MATMUL, "int8", 128, N, K, 20, torch.float32)
    x, weight, bias = make_inputs(case, DEVICE, seed=3)
    triton_dequant.clear_scratch()
    y = triton_dequant.dequant_matmul(x, weight, bias, max_scratch_elements=90 * K)
    assert_ok(compare(case, y, x, weight, bias))
    assert triton_dequant.scratch_bytes() == 90 * K * 4  # three chunks, one buffer
    first = triton_dequant.scratch(90 * K, DEVICE, torch.float32).data_ptr()
    triton_dequant.dequant_matmul(x, weight, bias, max_scratch_elements=90 * K)
    assert triton_dequant.scratch(90 * K, DEVICE, torch.float32).data_ptr() == first


def test_leading_dims_are_kept():
    case = Case(gateway.TRITON_GEMV, "int4", 128, 64, 128, 6, torch.float32)
    x, weight, bias = make_inputs(case, DEVICE)
    x3 = x.reshape(2, 3, 128)
    for path in (gateway.TRITON_GEMV, gateway.TRITON_DEQUANT_MATMUL):
        y = gateway.run_path(path, x3, weight, bias)
        assert y.shape == (2, 3, 64)
        assert_ok(compare(case, y.reshape(6, 64), x, weight, bias))


def test_wrong_input_width_is_refused():
    weight = quantize_weight(torch.randn(16, 64), QuantSpec("int4", 32))
    with pytest.raises(ValueError, match="expects 64"):
        gateway.run_path(gateway.TRITON_GEMV, torch.randn(1, 65), weight)
    with pytest.raises(ValueError, match="unknown kernel path"):
        gateway.run_path("cuda-magic", torch.randn(1, 64), weight)


def test_gateway_uses_reference_on_cpu_and_when_forced():
    weight = quantize_weight(torch.randn(16, 64), QuantSpec("int4", 32))
    x = torch.randn(2, 64)
    assert gateway.kernel_path(x, weight) == gateway.REFERENCE
    expected = gateway.run_path(gateway.REFERENCE, x, weight)
    torch.testing.assert_close(gateway.quantized_linear(x, weight), expected, rtol=0, atol=0)
    was = gateway.reference_forced()
    try:
        gateway.force_reference(True)
        assert gateway.reference_forced()
        assert gateway.kernel_path(x.to(DEVICE), weight) == gateway.REFERENCE
    finally:
        gateway.force_reference(was)


def _cuda_like(rows, dtype=torch.bfloat16):
    """A stand-in for a CUDA tensor: kernel_path only reads these attributes."""
    device = torch.device("cuda", 0)
    return SimpleNamespace(is_cuda=True, dtype=dtype, shape=(rows, 64), device=device,
                           numel=lambda: rows * 64)


@pytest.mark.parametrize(("rows", "dtype", "expected"), [
    (1, torch.bfloat16, gateway.TRITON_GEMV),
    (16, torch.float16, gateway.TRITON_GEMV),
    (17, torch.float32, gateway.TRITON_DEQUANT_MATMUL),
    (64, torch.bfloat16, gateway.TRITON_DEQUANT_MATMUL),
    (4, torch.float64, gateway.REFERENCE),
])
def test_dispatch_rules_on_cuda(monkeypatch, rows, dtype, expected):
    monkeypatch.setattr(gateway, "_triton_available", True)
    weight = SimpleNamespace(qweight=SimpleNamespace(device=torch.device("cuda", 0)))
    assert gateway.kernel_path(_cuda_like(rows, dtype), weight) == expected
    monkeypatch.setattr(gateway, "_triton_available", False)
    assert gateway.kernel_path(_cuda_like(rows, dtype), weight) == gateway.REFERENCE


# Imported checkpoints: fp16 scales (GGUF, AWQ, GPTQ) and float minimums (GGUF Q4_1).
@pytest.mark.parametrize("path", [gateway.TRITON_GEMV, gateway.TRITON_DEQUANT_MATMUL])
@pytest.mark.parametrize("scheme", ["int4", "int4-asym", "int4-min", "int8"])
def test_imported_layouts_match_reference(path, scheme):
    for rows in ((1, 5) if path == gateway.TRITON_GEMV else (40,)):
        for dtype in (torch.float16, torch.float32):
            case = Case(path, scheme, 32, 70, 160, rows, dtype, scale_dtype="fp16")
            assert_ok(run_case(case, DEVICE, seed=4))


# GGUF raw blocks (K-quants, Q5_0/Q5_1): N not a multiple of BLOCK_N, K three super-blocks
# (or nine 32-element blocks: a partial K tile), decode and prefill paths, three dtypes.
@pytest.mark.parametrize("scheme", block_formats.BLOCK_SCHEMES)
def test_raw_block_layouts_match_reference(scheme):
    fmt = block_formats.FORMATS[scheme]
    k_in = 3 * fmt.block_elements if fmt.block_elements == 256 else 9 * fmt.block_elements
    for path, rows, dtype in ((gateway.TRITON_GEMV, 1, torch.bfloat16),
                              (gateway.TRITON_GEMV, 5, torch.float16),
                              (gateway.TRITON_DEQUANT_MATMUL, 40, torch.float32)):
        case = Case(path, scheme, fmt.block_elements, 70, k_in, rows, dtype, scale_dtype="fp16")
        assert_ok(run_case(case, DEVICE, seed=5))


@pytest.mark.parametrize("scheme", block_formats.BLOCK_SCHEMES)
def test_raw_block_dequant_kernel_is_bit_exact(scheme):
    """The prefill kernel's float32 tile equals the reference dequantization bit for bit."""
    from offload_engine.kernels.triton_dequant import dequantize_into

    fmt = block_formats.FORMATS[scheme]
    case = Case(gateway.TRITON_DEQUANT_MATMUL, scheme, fmt.block_elements, 33,
                2 * fmt.block_elements, 1, torch.float32, scale_dtype="fp16")
    _, weight, _ = make_inputs(case, DEVICE, seed=6)
    out = torch.empty(33, 2 * fmt.block_elements, device=DEVICE)
    dequantize_into(weight, out)
    assert torch.equal(out, dequantize_weight(weight).to(DEVICE))


def test_raw_block_gemv_split_k():
    from offload_engine.kernels.triton_gemv import GemvConfig, gemv

    case = Case(gateway.TRITON_GEMV, "gguf-q4_k", 256, 40, 1280, 3, torch.float32,
                scale_dtype="fp16")
    x, weight, bias = make_inputs(case, DEVICE, seed=7)
    y = gemv(x, weight, bias, config=GemvConfig(block_n=32, block_k=256, split_k=2))
    assert_ok(compare(case, y, x, weight, bias))
