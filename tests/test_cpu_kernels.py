"""The CPU int4 path (torch's packed int4 matmul) against the pure-torch reference, and the
runtime's prepacked cache format that feeds it."""

import pytest
import torch

from offload_engine.kernels import cpu_gemv, cpu_int4, gateway
from offload_engine.kernels.selfcheck import Case, make_inputs, run_case
from offload_engine.planning.sizes import auto_cache_format, held_nbytes
from offload_engine.quant.layout import QuantSpec

CPU = torch.device("cpu")
SHAPES = ((70, 301), (48, 256))  # N off a multiple of 16 and K off a group, and aligned


def assert_ok(result):
    assert result.ok, (f"{result.case.label}: max |err| {result.max_abs_err:.3g}, "
                       f"err/tol {result.worst_ratio:.3g} (tol {result.tolerance:.3g})")


@pytest.mark.parametrize("scale_dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("group", cpu_int4.GROUP_SIZES)
@pytest.mark.parametrize("scheme", cpu_int4.SCHEMES)
def test_cpu_int4_matches_reference(scheme, group, scale_dtype):
    for n_out, k_in in SHAPES:
        for rows in (1, 5, 16, 67):  # decode rows and a prefill block
            case = Case(gateway.CPU_INT4PACK, scheme, group, n_out, k_in, rows,
                        torch.bfloat16, bias=rows % 2 == 1, scale_dtype=scale_dtype)
            assert_ok(run_case(case, CPU, seed=rows))


def test_prepacked_weight_takes_the_cpu_path_and_equals_run_path():
    x, weight, bias = make_inputs(Case(gateway.CPU_INT4PACK, "int4-min", 32, 70, 301, 3,
                                       torch.bfloat16, scale_dtype="fp16"), CPU)
    prepared = gateway.prepare_cpu_weight(weight)
    assert gateway.kernel_path(x, prepared) == gateway.CPU_INT4PACK
    assert gateway.kernel_path(x, weight) == gateway.REFERENCE  # not prepacked: no per-call pack
    x3 = x.reshape(1, 3, -1)  # leading dims are kept
    y = gateway.quantized_linear(x3, prepared, bias)
    assert y.shape == (1, 3, 70) and y.dtype == torch.bfloat16
    assert torch.equal(y.reshape(3, 70), gateway.run_path(gateway.CPU_INT4PACK, x, weight, bias))


def test_other_dtypes_schemes_and_forcing_fall_back_to_the_reference():
    x, weight, _ = make_inputs(Case(gateway.REFERENCE, "int4", 64, 32, 128, 1, torch.bfloat16),
                               CPU)
    prepared = gateway.prepare_cpu_weight(weight)
    assert gateway.kernel_path(x.float(), prepared) == gateway.REFERENCE  # float32: scalar op
    assert gateway.kernel_path(x[:0], prepared) == gateway.REFERENCE
    gateway.force_reference(True)
    try:
        assert gateway.kernel_path(x, prepared) == gateway.REFERENCE
    finally:
        gateway.force_reference(False)
    _, int8, _ = make_inputs(Case(gateway.REFERENCE, "int8", 64, 32, 128, 1, torch.bfloat16),
                             CPU)
    assert gateway.prepare_cpu_weight(int8) is int8  # not in the allow-list: not prepacked
    # int8 never takes torch's int4 op: our C++ GEMV where it builds (tests/test_cpu_gemv.py)
    assert gateway.kernel_path(x, int8) == (gateway.CPU_GEMV if cpu_gemv.available()
                                            else gateway.REFERENCE)
    assert cpu_int4.prepacked_shapes(QuantSpec("int8", 64), 32, 128) == {}


def test_auto_cache_format_and_held_bytes():
    spec = QuantSpec("int4-min", 32, "fp16")
    assert auto_cache_format("cpu", torch.bfloat16, spec) == "prepacked"
    assert auto_cache_format("cpu", torch.float32, spec) == "dequantized"
    assert auto_cache_format("cpu", torch.bfloat16, QuantSpec("int8", 32)) == "dequantized"
    assert auto_cache_format("cuda", torch.bfloat16, spec) == "packed"
    x, weight, _ = make_inputs(Case(gateway.REFERENCE, "int4-min", 32, 70, 301, 1,
                                    torch.bfloat16, scale_dtype="fp16"), CPU)
    prepared = gateway.prepare_cpu_weight(weight)
    extra = held_nbytes(weight, "prepacked", torch.bfloat16) - held_nbytes(
        weight, "packed", torch.bfloat16)
    assert extra >= prepared.prepacked_nbytes > 0
    assert prepared.prepacked_nbytes == 80 * 320 // 2 + (320 // 32) * 80 * 2 * 2


def _greedy(directory, steps=10, **overrides):
    from offload_engine import load

    with load(directory, progress=False, device="cpu", **overrides) as engine:
        result = engine.generate("The class statement", greedy=True, max_new_tokens=steps)
        return result.token_ids, engine.stats


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_prepacked_runtime_matches_packed_reference_and_is_budget_independent(request, arch):
    """bfloat16 on CPU: the prepacked format (CPU kernel) decodes what the packed format
    (reference) decodes, at the minimum and unbounded budgets."""
    directory = request.getfixturevalue(f"{arch}_q")
    unbounded, stats = _greedy(directory, dtype="bfloat16")
    assert stats["cache_format"] == "prepacked"
    minimum, stats_min = _greedy(directory, dtype="bfloat16", cache_entries=3)
    assert stats_min["h2d_bytes"] > 0  # weights streamed through a slot and prepacked there
    packed, _ = _greedy(directory, dtype="bfloat16", cache_format="packed")
    assert unbounded == minimum
    # the two paths round differently (torch's kernel vs bf16 F.linear): the first tokens agree
    assert unbounded[:4] == packed[:4]


def test_prepacked_format_is_refused_off_cpu():
    from offload_engine.errors import ConfigError
    from offload_engine.runtime.config import EngineConfig

    if torch.cuda.is_available():
        with pytest.raises(ConfigError, match="prepacked"):
            EngineConfig(device="cuda:0", cache_format="prepacked")
    assert EngineConfig(device="cpu", cache_format="prepacked").resolved_cache_format() \
        == "prepacked"
