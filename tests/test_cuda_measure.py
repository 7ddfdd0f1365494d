"""calibrate and bench on a GPU: skipped without one; `pytest -m cuda` (and
tools/gpu_report.sh) runs them the first time a GPU is at hand."""

import csv

import pytest
import torch

from offload_engine.cli import main
from offload_engine.planning.profiles import load_profile

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_calibrate_on_cuda_writes_a_measured_profile(tmp_path):
    path = tmp_path / "card.toml"
    assert main(["calibrate", "--device", "cuda:0", "--quick", "-o", str(path)]) == 0
    profile = load_profile(path)
    assert profile.device == "cuda" and profile.memory_bytes > 2**30
    assert profile.h2d_bandwidth > 1e8 and profile.device_bandwidth > 1e9
    assert 0 < profile.op_overhead_s < 1e-3 and profile.kernel_bandwidth > 0


def test_bench_on_cuda_matches_the_plans_bytes_and_reports_peak_memory(qwen2_q, tmp_path,
                                                                        capsys):
    out = tmp_path / "bench"
    assert main(["bench", str(qwen2_q), "--device", "cuda:0", "--budgets", "min,unbounded",
                 "--policies", "static", "--tokens", "3", "--out-dir", str(out),
                 "--no-progress"]) == 0
    assert torch.cuda.get_device_name(0) in capsys.readouterr().out
    for row in csv.DictReader((out / "bench.csv").open()):
        assert float(row["h2d_bytes_per_token"]) == pytest.approx(
            float(row["predicted_bytes_per_token"]))
        assert int(row["peak_device_bytes"]) > 0
