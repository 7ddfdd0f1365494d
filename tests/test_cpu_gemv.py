"""The C++ CPU int4/int8 GEMV kernel (kernels/cpu_gemv.py) against the pure-torch reference,
and its fallback when it cannot be built. The first test builds the extension (about a
minute on a 2-core machine; torch caches it under TORCH_EXTENSIONS_DIR)."""

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offload_engine.kernels import cpu_gemv, gateway
from offload_engine.kernels.selfcheck import Case, compare, make_inputs

CPU = torch.device("cpu")
SHAPES = ((70, 301), (33, 96))  # N not a multiple of 16, K off a group / a few groups


def _compiler_present() -> bool:
    from torch.utils.cpp_extension import is_ninja_available

    cpu_gemv.ninja_on_path()  # as the build does
    return shutil.which("c++") is not None and is_ninja_available()


needs_compiler = pytest.mark.skipif(not _compiler_present(),
                                    reason="no C++ compiler or ninja: the kernel cannot build")


@needs_compiler
@pytest.mark.parametrize("group", cpu_gemv.GROUP_SIZES)
@pytest.mark.parametrize("scheme", cpu_gemv.SCHEMES)
def test_gemv_matches_reference(scheme, group):
    assert cpu_gemv.available()
    # GGUF Q4_1 and Q8_0 imports have fp16 scales
    scale_dtype = "fp16" if scheme in ("int4-min", "int8") else "bf16"
    for n_out, k_in in SHAPES:
        for rows in (1, 2, 3, 4):
            for dtype in cpu_gemv.DTYPES:
                case = Case(gateway.CPU_GEMV, scheme, group, n_out, k_in, rows, dtype,
                            bias=rows % 2 == 1, scale_dtype=scale_dtype)
                x, weight, bias = make_inputs(case, CPU, seed=rows)
                for vectorized in (True, False):  # AVX2 (where built with it) and plain C++
                    y = cpu_gemv.gemv_linear(x, weight, bias, vectorized=vectorized)
                    result = compare(case, y, x, weight, bias)
                    assert result.ok, (f"{case.label} vectorized={vectorized}: "
                                       f"err/tol {result.worst_ratio:.3g}")


@needs_compiler
def test_gemv_keeps_leading_dims_and_refuses_what_it_cannot_read():
    x, weight, _ = make_inputs(Case(gateway.CPU_GEMV, "int4", 32, 48, 64, 2, torch.bfloat16),
                               CPU)
    y = gateway.run_path(gateway.CPU_GEMV, x.reshape(1, 2, 64), weight)
    assert y.shape == (1, 2, 48) and torch.equal(y.reshape(2, 48), cpu_gemv.gemv_linear(x, weight))
    assert cpu_gemv.accepts(x, weight)
    assert not cpu_gemv.accepts(torch.zeros(5, 64, dtype=torch.bfloat16), weight)  # prefill
    assert not cpu_gemv.accepts(x.half(), weight)
    transposed = type(weight)(**{**weight.__dict__, "qweight": weight.qweight.t().t()[:, ::2]})
    assert not cpu_gemv.supports(transposed)  # a strided view: the kernel reads rows whole


@needs_compiler
def test_int8_cpu_steps_take_the_gemv_by_default(monkeypatch):
    """torch has no group-wise int8 CPU kernel: 1-4 rows of an int8 weight (a GGUF's Q8_0
    output) run in ours unless OFFLOAD_CPU_GEMV=0; prefill and float16 keep the reference."""
    x, weight, bias = make_inputs(Case(gateway.CPU_GEMV, "int8", 32, 70, 301, 1,
                                       torch.bfloat16, bias=True, scale_dtype="fp16"), CPU)
    prepared = gateway.prepare_cpu_weight(weight)  # int8 has no prepacked form
    assert gateway.kernel_path(x, prepared) == gateway.CPU_GEMV
    assert torch.equal(gateway.quantized_linear(x, prepared, bias),
                       gateway.run_path(gateway.CPU_GEMV, x, weight, bias))
    assert gateway.kernel_path(torch.cat([x] * 5), prepared) == gateway.REFERENCE  # prefill
    assert gateway.kernel_path(x.half(), prepared) == gateway.REFERENCE
    monkeypatch.setattr(gateway, "_cpu_gemv_int8", False)  # OFFLOAD_CPU_GEMV=0
    assert gateway.kernel_path(x, prepared) == gateway.REFERENCE


@needs_compiler
def test_one_row_bf16_steps_on_prepacked_weights_take_the_gemv(monkeypatch):
    x, weight, bias = make_inputs(Case(gateway.CPU_GEMV, "int4-min", 32, 70, 301, 1,
                                       torch.bfloat16, scale_dtype="fp16"), CPU)
    prepared = gateway.prepare_cpu_weight(weight)
    assert gateway.kernel_path(x, prepared) == gateway.CPU_INT4PACK  # opt-in: off by default
    monkeypatch.setattr(gateway, "_cpu_gemv_enabled", True)  # OFFLOAD_CPU_GEMV=1
    assert gateway.kernel_path(x, prepared) == gateway.CPU_GEMV
    assert torch.equal(gateway.quantized_linear(x, prepared, bias),
                       gateway.run_path(gateway.CPU_GEMV, x, weight, bias))
    two = torch.cat([x, x])
    assert gateway.kernel_path(two, prepared) == gateway.CPU_INT4PACK  # more rows: torch's op
    assert gateway.kernel_path(x.float(), prepared) == gateway.REFERENCE  # as before
    assert gateway.kernel_path(x, weight) == gateway.REFERENCE  # not prepacked: as before
    monkeypatch.setattr(gateway, "_cpu_gemv_enabled", False)  # back to the default
    assert gateway.kernel_path(x, prepared) == gateway.CPU_INT4PACK


def test_failed_build_falls_back_with_one_warning(monkeypatch, caplog):
    def no_compiler():
        raise OSError("no compiler here")

    monkeypatch.setattr(cpu_gemv, "_builder", no_compiler)
    cpu_gemv.reset()
    try:
        x, weight, _ = make_inputs(Case(gateway.CPU_GEMV, "int4", 32, 48, 64, 1,
                                        torch.bfloat16), CPU)
        with caplog.at_level(logging.WARNING, logger=cpu_gemv.__name__):
            assert not cpu_gemv.available()
            assert not cpu_gemv.accepts(x, weight)
            assert not cpu_gemv.available()  # not retried
        warnings = [r for r in caplog.records if "could not be built" in r.getMessage()]
        assert len(warnings) == 1
        prepared = gateway.prepare_cpu_weight(weight)
        assert gateway.kernel_path(x, prepared) == gateway.CPU_INT4PACK
        _, int8, _ = make_inputs(Case(gateway.CPU_GEMV, "int8", 32, 48, 64, 1,
                                      torch.bfloat16), CPU)
        assert gateway.kernel_path(x, int8) == gateway.REFERENCE  # int8: the reference
        with pytest.raises(RuntimeError, match="not built"):
            cpu_gemv.gemv_linear(x, weight)
    finally:
        cpu_gemv.reset()


def test_nothing_builds_at_import():
    code = ("import offload_engine.cli, offload_engine.kernels.gateway as g; "
            "from offload_engine.kernels import cpu_gemv; "
            "assert cpu_gemv._module is None and not cpu_gemv._failed")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_build_flags_follow_the_cpu(monkeypatch):
    monkeypatch.setattr(cpu_gemv, "cpu_flags", lambda: {"sse2"})
    assert "-mavx2" not in cpu_gemv.build_flags()
    monkeypatch.setattr(cpu_gemv, "cpu_flags", lambda: {"avx2", "fma", "f16c"})
    capability = torch.backends.cpu.get_cpu_capability()
    assert ("-mavx2" in cpu_gemv.build_flags()) == (capability in ("AVX2", "AVX512"))


@needs_compiler
def test_int8_gemv_is_one_op_in_a_compiled_graph():
    """A --compile step holds resident weights as constants: the int8 kernel must enter its
    graph as our op, not as the reference's dequantization of the whole matrix."""
    x, weight, bias = make_inputs(Case(gateway.CPU_GEMV, "int8", 32, 70, 301, 1,
                                       torch.bfloat16, bias=True, scale_dtype="fp16"), CPU)
    assert cpu_gemv.available()  # the eager prefill builds it before any trace
    graphs = []

    def keep_graph(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    step = torch.compile(lambda rows: gateway.quantized_linear(rows, weight, bias),
                         backend=keep_graph, fullgraph=True)
    assert torch.equal(step(x), gateway.quantized_linear(x, weight, bias))
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert targets == ["offload_engine.cpu_gemv_int8"]
    torch._dynamo.reset()


@needs_compiler
def test_load_builds_the_kernel_before_the_first_token(monkeypatch, tmp_path, llama_src):
    """A GGUF import's int8 output computed on the CPU: the one-time build happens in load(),
    not inside the first reply. With the decode steps off (kernels/cpu_decode.py), a
    float32 (dequantized) cache never needs it; with them on, every CPU load does."""
    from offload_engine import load
    from offload_engine.checkpoint.convert import convert
    from offload_engine.kernels import cpu_decode
    from tests import tiny_gguf

    built = cpu_gemv.load()
    builds = []
    monkeypatch.setattr(cpu_gemv, "_builder", lambda: builds.append(1) or built)
    path = tiny_gguf.write_llama_gguf(tmp_path / "t.gguf", llama_src, {})  # Q8_0 embedding
    convert(path, tmp_path / "q", progress=False)
    try:
        cpu_gemv.reset()
        cpu_decode.set_enabled(False)
        with load(tmp_path / "q", progress=False, device="cpu", dtype="float32"):
            assert builds == []
        with load(tmp_path / "q", progress=False, device="cpu", dtype="bfloat16"):
            assert builds == [1]
        cpu_gemv.reset()
        cpu_decode.set_enabled(True)
        with load(tmp_path / "q", progress=False, device="cpu", dtype="float32"):
            assert builds == [1, 1]
    finally:
        cpu_decode.set_enabled(True)
        cpu_gemv.reset()


def test_the_ninja_wheel_is_put_on_path(monkeypatch):
    """torch runs `ninja` from PATH; ours comes as a wheel into a venv nobody activated."""
    ninja = pytest.importorskip("ninja")
    monkeypatch.setenv("PATH", "/nonexistent")
    cpu_gemv.ninja_on_path()
    assert shutil.which("ninja") == str(Path(ninja.BIN_DIR) / "ninja")
    cpu_gemv.ninja_on_path()  # once is enough
    assert os.environ["PATH"] == os.pathsep.join((ninja.BIN_DIR, "/nonexistent"))
