"""tools/gpu_report.sh end to end on CPU with a tiny synthetic model, so it works the first
time it meets a GPU. (Its kernel and CUDA-test steps are covered by test_kernels.py and
test_cuda.py; they are switched off here to keep this test fast.)"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_tools import _tool
from tests.tiny import tiny_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # five fresh interpreters import torch and transformers: about a minute
def test_gpu_report_runs_on_cpu_and_writes_a_summary(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(tiny_config("qwen2").to_json_string())
    out = tmp_path / "report"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "DEVICE": "cpu",
           "MODEL": str(config), "GROUP_SIZE": "64", "SYNTH_DIR": str(tmp_path / "synth"),
           "BUDGETS": "min,unbounded", "TOKENS": "2", "CALIBRATE_ARGS": "--quick",
           "RUN_TESTS": "0", "KERNELS": "0", "OMP_WAIT_POLICY": "PASSIVE"}
    result = subprocess.run(["bash", str(ROOT / "tools" / "gpu_report.sh")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"report: {out.resolve()}/summary.md" in result.stdout
    summary = (out / "summary.md").read_text()
    assert "a CPU run" in summary and "PREDICTED tok/s" in summary
    assert "| min | static | 1 |" in summary and "| unbounded | static | 1 |" in summary
    assert "per-op overhead" in summary and "measured here (calibrate)" in summary
    assert "synthetic model (`offload-engine synth`)" in summary
    for name in ("environment.txt", "calibrate.txt", "plan.txt", "bench/bench.csv",
                 "bench/bench.png", "profile.toml"):
        assert (out / name).is_file(), name


def test_summary_names_a_missing_bench_instead_of_crashing(tmp_path, capsys):
    summary = _tool("gpu_report_summary")
    assert summary.main([str(tmp_path)]) == 2
    assert "bench.json" in capsys.readouterr().err


def test_kernel_tool_without_a_gpu_says_what_it_can_do(capsys):
    bench_kernels = _tool("bench_kernels")
    assert bench_kernels.main(["--bytes"]) == 0
    assert bench_kernels.main([]) == 0
    assert "need a CUDA GPU" in capsys.readouterr().out


def _wheel_pins():
    lines = (ROOT / "tools" / "gpu_wheels.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def test_gpu_wheel_list_pins_one_version_of_each_package():
    pins = _wheel_pins()
    names = [pin.split("==")[0].lower().replace("_", "-") for pin in pins]
    assert all(pin.count("==") == 1 for pin in pins), pins
    assert len(names) == len(set(names)), "two versions of one package stop the install"
    # what the GPU image lacks for `run`, GGUF import and `serve`
    assert {"gguf", "fastapi", "uvicorn", "pydantic", "pydantic-core"} <= set(names)


def test_gpu_session_names_its_stages_on_a_wrong_one(tmp_path):
    env = {**os.environ, "RESULTS": str(tmp_path / "out"), "WORK": str(tmp_path / "work")}
    result = subprocess.run(["bash", str(ROOT / "tools" / "gpu_session.sh"), "everything"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "check|measure|moe" in result.stderr
