"""`offload-engine run` and `chat` end to end on a tiny model."""

import json
import os
import subprocess
import sys

from offload_engine.cli import main


def test_run_streams_text_and_writes_stats(qwen2_q, tmp_path, capsys):
    stats_path = tmp_path / "stats.json"
    code = main(["run", str(qwen2_q), "--prompt", "the", "--greedy", "--max-new-tokens", "6",
                 "--cache-entries", "3", "--policy", "static", "--prefetch-depth", "1",
                 "--device", "cpu", "--no-progress", "--stats-json", str(stats_path)])
    assert code == 0
    captured = capsys.readouterr()
    assert "tok/s" in captured.err and "host->device" in captured.err and "CPU" in captured.err
    stats = json.loads(stats_path.read_text())
    for key in ("new_tokens", "decode_tokens_per_s", "time_to_first_token_s",
                "h2d_bytes_per_token", "hit_rate", "resident_bytes", "streamed_bytes",
                "policy", "budget_bytes", "device_name"):
        assert key in stats, key
    assert stats["h2d_bytes_per_token"] == stats["streamed_bytes"]


def test_run_reports_bad_flags_in_one_line(qwen2_q, capsys):
    assert main(["run", str(qwen2_q), "--prompt", "x", "--gpu-budget", "12 parsecs"]) == 2
    assert "--gpu-budget" in capsys.readouterr().err
    assert main(["run", str(qwen2_q), "--prompt", "x", "--gpu-budget", "1KiB",
                 "--no-progress"]) == 2
    assert "below the minimum" in capsys.readouterr().err
    assert main(["run", str(qwen2_q), "--prompt", "x", "--device", "cuda:0",
                 "--no-progress"]) in (0, 2)


def test_chat_reset_and_exit(qwen2_q, tmp_path):
    script = "hello\n/reset\nagain\n/exit\n"
    result = subprocess.run(
        [sys.executable, "-m", "offload_engine", "chat", str(qwen2_q), "--greedy",
         "--max-new-tokens", "4", "--no-progress", "--device", "cpu"],
        input=script, capture_output=True, text=True, timeout=120,
        env={**os.environ, "OFFLOAD_ENGINE_CACHE": str(tmp_path)})  # chat_history goes here
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("bot> ") == 2
    assert "(history cleared)" in result.stderr
