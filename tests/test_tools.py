"""tools/bench.py and `offload-engine trace-summary` on the tiny Qwen2, for real."""

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from offload_engine.cli import main

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def _tool(name: str):
    """Import a script from tools/ (it is not a package) under its own name."""
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trace_summary():
    from offload_engine.runtime import trace_summary

    return trace_summary


def test_bench_wrapper_writes_csv_json_and_png_from_real_runs(qwen2_q, tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, str(TOOLS / "bench.py"), str(qwen2_q), "--budgets", "min,unbounded",
         "--tokens", "2", "--device", "cpu", "--linear-overhead-calls", "50",
         "--out-dir", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "CPU timings" in result.stdout and "device cpu: CPU" in result.stdout
    assert "identical across every budget, policy and depth: True" in result.stdout
    rows = list(csv.DictReader((out / "bench.csv").open()))
    assert {(r["policy"], r["budget"]) for r in rows} == {
        ("static", "min"), ("static", "unbounded"), ("lru", "min"), ("lru", "unbounded")}
    for row in rows:
        assert int(row["new_tokens"]) == 2 and int(row["forward_passes"]) >= 2
        # every row's counters came from the engine, and match the planner where it is exact
        assert float(row["h2d_bytes_per_token"]) == pytest.approx(
            float(row["predicted_bytes_per_token"]))
        assert float(row["decode_tokens_per_s"]) > 0
    static = {r["budget"]: r for r in rows if r["policy"] == "static"}
    assert float(static["min"]["h2d_bytes_per_token"]) > 0
    assert float(static["unbounded"]["hit_rate"]) == 1.0
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "bench.json").read_text())
    assert summary["cpu_run"] and len(summary["linear_overhead"]) == 3
    assert all(item["offloaded_linear_us"] > 0 for item in summary["linear_overhead"])


def test_trace_summary_on_a_real_trace(qwen2_q, tmp_path, capsys, trace_summary):
    trace = tmp_path / "trace.json"
    assert main(["run", str(qwen2_q), "--prompt", "the", "--greedy", "--max-new-tokens", "3",
                 "--cache-entries", "3", "--prefetch-depth", "1", "--device", "cpu",
                 "--no-progress", "--profile-trace", str(trace)]) == 0
    capsys.readouterr()
    summary = trace_summary.summarise(trace_summary.load_spans(trace))
    fetch, wait, linear = (summary.ranges[n] for n in ("offload.fetch", "offload.wait",
                                                       "offload.linear"))
    assert linear.count % 15 == 0 and linear.count >= 3 * 15  # 2 layers x 7 + lm_head per pass
    assert fetch.count > 0 and wait.count > 0
    assert summary.threads["offload.fetch"] != summary.threads["offload.linear"]
    assert 0.0 <= summary.hidden_fetch_ms <= summary.fetch_ms
    assert summary.stall_ms == pytest.approx(wait.total_ms)
    assert linear.mean_us == pytest.approx(linear.total_ms * 1e3 / linear.count)
    assert main(["trace-summary", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "hidden under compute" in out and "total stall" in out
    assert main(["trace-summary", str(tmp_path / "missing.json")]) == 2
    assert "cannot read a Chrome trace" in capsys.readouterr().err
    # --profile-steps 1: the prefill pass alone, and nothing of the profiler's own log
    # (its start/stop lines) inside the generated text
    steps = tmp_path / "one.json"
    assert main(["run", str(qwen2_q), "--prompt", "the", "--greedy", "--max-new-tokens", "3",
                 "--cache-entries", "3", "--prefetch-depth", "1", "--device", "cpu",
                 "--no-progress", "--profile-trace", str(steps), "--profile-steps", "1"]) == 0
    captured = capsys.readouterr()
    assert "profiler" not in captured.out and "profiler" not in captured.err
    assert trace_summary.summarise_file(steps).ranges["offload.linear"].count == 15


def test_overlap_arithmetic_on_a_synthetic_trace(tmp_path, trace_summary):
    def event(name, tid, ts, dur):
        return {"ph": "X", "name": name, "tid": tid, "pid": 1, "ts": ts, "dur": dur}

    events = [
        event("offload.linear", 1, 0, 100), event("offload.wait", 1, 10, 30),  # compute 70
        event("offload.linear", 1, 200, 50),  # compute 50
        event("offload.fetch", 2, 0, 60),  # overlaps compute 0-10 and 40-60: 30 hidden
        event("offload.fetch", 2, 150, 80),  # overlaps compute 200-230: 30 hidden
        {"ph": "M", "name": "thread_name", "tid": 2},
    ]
    path = tmp_path / "synthetic.json"
    path.write_text(json.dumps({"traceEvents": events}))
    summary = trace_summary.summarise(trace_summary.load_spans(path))
    assert summary.fetch_ms == pytest.approx(0.140)
    assert summary.hidden_fetch_ms == pytest.approx(0.060)
    assert summary.hidden_share == pytest.approx(60 / 140)
    assert summary.compute_ms == pytest.approx(0.120)
    assert summary.stall_ms == pytest.approx(0.030)
    assert summary.ranges["offload.linear"].count == 2
