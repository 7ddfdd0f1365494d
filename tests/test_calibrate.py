"""`offload-engine calibrate` on CPU: a measured profile that plan and run accept."""

import pytest

from offload_engine.cli import main
from offload_engine.planning.overhead import figure_sources
from offload_engine.planning.profiles import load_profile


@pytest.fixture(scope="module")
def cpu_profile(tmp_path_factory):
    path = tmp_path_factory.mktemp("calibrate") / "my-cpu.toml"
    disk = tmp_path_factory.mktemp("disk")
    assert main(["calibrate", "--device", "cpu", "--quick", "-o", str(path),
                 "--name", "my-cpu", "--disk-dir", str(disk)]) == 0
    assert list(disk.iterdir()) == []  # the scratch file is gone
    return path


def test_calibrate_writes_a_measured_cpu_profile(cpu_profile):
    profile = load_profile(cpu_profile)
    assert profile.name == "my-cpu" and profile.device == "cpu"
    assert profile.h2d_bandwidth > 0 and profile.device_bandwidth > 0
    assert profile.kernel_bandwidth > 0 and profile.op_overhead_s > 0
    assert "measured by offload-engine calibrate" in profile.op_overhead_source
    figures = figure_sources(profile)
    assert profile.disk_read_bandwidth > 0
    assert len(figures["measured"]) == 5 and figures["estimated"] == []


def test_plan_and_run_accept_the_calibrated_profile(cpu_profile, qwen2_q, capsys):
    capsys.readouterr()
    assert main(["plan", str(qwen2_q), "--hw-profile", str(cpu_profile)]) == 0
    out = capsys.readouterr().out
    assert "hardware: my-cpu" in out and "estimated: none" in out
    assert "per-op overhead (op_overhead_us)" in out
    assert main(["run", str(qwen2_q), "--prompt", "the", "--greedy", "--max-new-tokens", "2",
                 "--device", "cpu", "--no-progress", "--hw-profile", str(cpu_profile)]) == 0


def test_calibrate_refuses_to_overwrite(cpu_profile, capsys):
    assert main(["calibrate", "--device", "cpu", "--quick", "-o", str(cpu_profile)]) == 2
    assert "--force" in capsys.readouterr().err


def test_disk_measurement_names_a_missing_directory(tmp_path):
    from offload_engine.errors import ConfigError
    from offload_engine.runtime.disk_speed import disk_read_bandwidth

    with pytest.raises(ConfigError, match="--disk-dir .*no such directory"):
        disk_read_bandwidth(tmp_path / "absent", 1 << 20)
    assert disk_read_bandwidth(tmp_path, 2 << 20, repeats=1) > 0
    assert list(tmp_path.iterdir()) == []


def test_per_step_time_is_the_difference_of_paired_runs(monkeypatch):
    from offload_engine.runtime import calibrate

    clock = {"now": 0.0}
    monkeypatch.setattr(calibrate.time, "perf_counter", lambda: clock["now"])

    def generate(tokens, setup=0.010, per_token=0.002):
        def run():
            clock["now"] += setup + per_token * tokens
        return run

    cpu = calibrate.torch.device("cpu")
    assert calibrate.seconds_per_step(generate, cpu, steps=4, repeats=3) == \
        pytest.approx(0.002)
    # A machine so busy that the longer run never looks longer: steps double, then the
    # long run's time per token is reported, an upper bound, never 0.
    flat = calibrate.seconds_per_step(lambda tokens: generate(1), cpu, steps=4, repeats=3,
                                      attempts=3)
    assert flat == pytest.approx(0.012 / (1 + 16))


def test_slow_figures_keep_their_digits(tmp_path):
    """A loaded machine measured 0.0004 GB/s once: written as 0.000 it made the profile
    unloadable ('h2d_bandwidth_gb_s must be positive')."""
    from offload_engine.runtime.calibrate import Calibration, profile_toml

    slow = Calibration(device="cpu", device_name="test", memory_bytes=8 * 2**30,
                       h2d_bandwidth=4e5, device_bandwidth=3e5, kernel_bandwidth=2e5,
                       op_overhead_s=2e-6, ops_per_step=10, step_seconds=1e-3, layers=2,
                       torch_version="x", when="today", disk_read_bandwidth=1e5)
    path = tmp_path / "slow.toml"
    path.write_text(profile_toml(slow, "slow", "1GiB"))
    profile = load_profile(path)
    assert profile.h2d_bandwidth == pytest.approx(4e5, rel=1e-3)
    assert profile.kernel_bandwidth == pytest.approx(2e5, rel=1e-3)
    assert profile.disk_read_bandwidth == pytest.approx(1e5, rel=1e-3)
