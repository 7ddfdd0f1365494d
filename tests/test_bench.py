"""`offload-engine bench` on CPU: real runs, measured beside PREDICTED, table/CSV/JSON/PNG."""

import csv
import dataclasses
import json

import pytest

from offload_engine.cli import main
from offload_engine.decode.bench import resolve_budget
from offload_engine.decode.generate import GenerationStats
from offload_engine.errors import ConfigError


def test_budget_labels_resolve_against_the_model():
    total, minimum = 1000, 100
    assert resolve_budget("min", total, minimum) == 100
    assert resolve_budget("50%", total, minimum) == resolve_budget("0.5", total, minimum) == 500
    assert resolve_budget("5%", total, minimum) == 100  # never below the minimum
    assert resolve_budget("unbounded", total, minimum) is None
    assert resolve_budget("1GiB", total, minimum) is None  # everything fits
    assert resolve_budget("300B", total, minimum) == 300
    with pytest.raises(ConfigError):
        resolve_budget("lots", total, minimum)


def test_bench_sweeps_and_writes_measured_and_predicted(qwen2_q, tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", str(qwen2_q), "--budgets", "min,unbounded", "--policies",
                 "static", "--prefetch-depths", "1,2", "--batch-sizes", "1,2", "--tokens", "3",
                 "--device", "cpu", "--out-dir", str(out), "--plot", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "device cpu: CPU" in printed and "torch" in printed and "triton" in printed
    assert "commit" in printed and "CPU timings" in printed
    assert "pred tok/s" in printed and "pred ovh ms" in printed
    rows = list(csv.DictReader((out / "bench.csv").open()))
    assert len(rows) == 2 * 2 * 2  # budgets x depths x batch sizes
    # every GenerationStats field flows into the CSV, whatever fields it gains later
    assert {f.name for f in dataclasses.fields(GenerationStats)} <= set(rows[0])
    for row in rows:
        assert float(row["h2d_bytes_per_token"]) == pytest.approx(
            float(row["predicted_bytes_per_token"]))
        assert float(row["decode_tokens_per_s"]) > 0 and float(row["predicted_tokens_per_s"]) > 0
        assert float(row["predicted_overhead_ms"]) > 0 and int(row["predicted_ops_per_step"]) > 0
    by_key = {(r["budget"], r["prefetch_depth"], r["batch"]): r for r in rows}
    one, two = by_key[("min", "2", "1")], by_key[("min", "2", "2")]
    # one pass over the streamed weights serves both sequences of a batch
    assert float(two["h2d_bytes_per_token"]) == pytest.approx(
        float(one["h2d_bytes_per_token"]) / 2)
    summary = json.loads((out / "bench.json").read_text())
    assert summary["cpu_run"] and summary["identical_outputs"] and summary["commit"]
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_reports_the_cpu_parts_bytes_per_second_beside_memory(qwen2_q, tmp_path,
                                                                      capsys):
    out = tmp_path / "bench"
    code = main(["bench", str(qwen2_q), "--budgets", "unbounded", "--policies", "static",
                 "--tokens", "3", "--device", "cpu", "--placement", "cpu", "--out-dir",
                 str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "CPU GB/s" in printed and "this machine's memory:" in printed
    assert "exp hit" not in printed  # a dense model has no expert columns
    row = next(csv.DictReader((out / "bench.csv").open()))
    rate = float(row["cpu_bytes_per_token"]) / float(row["cpu_seconds_per_token"]) / 1e9
    assert float(row["cpu_gb_per_s"]) == pytest.approx(rate) and rate > 0
    assert json.loads((out / "bench.json").read_text())["memory_gb_per_s"] > 0


def test_bench_refuses_a_fixed_budget(qwen2_q, capsys):
    assert main(["bench", str(qwen2_q), "--gpu-budget", "1MiB", "--device", "cpu"]) == 2
    assert "--budgets" in capsys.readouterr().err


def test_card_budgets_are_what_plan_leaves_for_weights(tmp_path):
    import json as _json

    from offload_engine.decode.bench import card_budget
    from offload_engine.planning.planner import PlanRequest, describe_model, make_plan
    from offload_engine.planning.profiles import load_profile
    from offload_engine.runtime.config import EngineConfig
    from tests.test_planner import QWEN25_32B

    config = tmp_path / "config.json"
    config.write_text(_json.dumps(QWEN25_32B))
    shape = describe_model(config)
    engine = EngineConfig(device="cpu", cache_format="packed", dtype="bfloat16")
    budget = card_budget(shape, "rtx4060-8gb", engine, "static", 2)
    planned = make_plan(shape, PlanRequest(load_profile("rtx4060-8gb")))
    assert budget == planned.settings["budget_bytes"]
    assert 3e9 < budget < 4.5e9  # an 8 GB card leaves ~3.7 GB for weights at context 4096


@pytest.mark.parametrize("command", ["bench", "calibrate", "synth"])
def test_help_of_the_measurement_commands(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: offload-engine " + command in capsys.readouterr().out


def test_bench_plot_has_one_legend_outside_the_panels_and_plain_log_labels():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from offload_engine.cli.bench_plot import draw

    rows = [{"policy": policy, "prefetch_depth": 2, "batch": 1, "budget_bytes": budget,
             "predicted_total_bytes": 4 * 2**30, "decode_tokens_per_s": tok_s,
             "predicted_tokens_per_s": tok_s * 1.1, "h2d_bytes_per_token": 1e8,
             "predicted_bytes_per_token": 1e8, "hit_rate": 0.5, "predicted_hit_rate": 0.5}
            for policy in ("static", "lru")
            for budget, tok_s in ((2**30, 6.0), (2 * 2**30, 60.0), (None, 600.0))]
    figure = draw(rows, "test")
    figure.canvas.draw()
    assert len(figure.legends) == 1 and all(axis.get_legend() is None for axis in figure.axes)
    assert len(figure.legends[0].get_texts()) == 4  # 2 series x measured/PREDICTED
    legend_box = figure.legends[0].get_window_extent()
    for axis in figure.axes:  # below the panels: hides no line
        assert legend_box.y1 <= axis.get_window_extent().y0
    labels = [t.get_text() for t in figure.axes[0].get_yticklabels()] + [
        t.get_text() for t in figure.axes[0].get_yticklabels(minor=True)]
    assert "60" in labels and not any("times" in label or "^" in label for label in labels)
    plt.close(figure)
