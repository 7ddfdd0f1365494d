"""`offload-engine chat`: a history longer than the context, /commands, line history."""

import os
import subprocess
import sys


def _chat(model, script, tmp_path, *flags):
    env = {**os.environ, "OFFLOAD_ENGINE_CACHE": str(tmp_path)}
    return subprocess.run(
        [sys.executable, "-m", "offload_engine", "chat", str(model), "--greedy",
         "--no-progress", "--device", "cpu", *flags],
        input=script, capture_output=True, text=True, timeout=180, env=env)


def test_chat_drops_oldest_turns_instead_of_dying(qwen2_q, tmp_path):
    # Each message is ~20 tokens; -c 60 holds about one exchange, so turns must be dropped.
    message = "the quick brown fox jumps over the lazy dog again and again\n"
    result = _chat(qwen2_q, message * 5 + "/exit\n", tmp_path, "-n", "6", "-c", "60")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("bot> ") == 5
    notices = [line for line in result.stderr.splitlines() if line.startswith("(dropped")]
    assert notices and "oldest message(s) to fit the context" in notices[0]
    assert "Traceback" not in result.stderr


def test_chat_skips_a_message_too_long_for_the_context(qwen2_q, tmp_path):
    result = _chat(qwen2_q, "word " * 80 + "\nhello\n/exit\n", tmp_path, "-n", "4", "-c", "40")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(not sent:" in result.stderr and "does not fit" in result.stderr
    assert result.stdout.count("bot> ") == 1  # the short message after it is answered


def test_chat_rejects_unknown_commands_and_keeps_history(qwen2_q, tmp_path):
    result = _chat(qwen2_q, "/bogus\n/help\nhello\n/exit\n", tmp_path, "-n", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "unknown command /bogus" in result.stderr
    assert result.stdout.count("bot> ") == 1  # /bogus and /help never reached the model
    history = (tmp_path / "chat_history").read_text().splitlines()
    assert history[-4:] == ["/bogus", "/help", "hello", "/exit"]
