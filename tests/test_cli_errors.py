"""Each bad input the README promises a one-line error for: exit 2, no traceback."""

import json
import shutil
import subprocess
import sys

import pytest

from offload_engine.cli import main

RUN = ["-n", "2", "--device", "cpu", "--no-progress"]


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("offload-engine: error:"), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture
def q_copy(tmp_path, qwen2_q):
    target = tmp_path / "q"
    shutil.copytree(qwen2_q, target)
    return target


@pytest.fixture
def src_copy(tmp_path, qwen2_src):
    target = tmp_path / "src"
    shutil.copytree(qwen2_src, target)
    return target


def _edit_config(directory, **fields):
    path = directory / "config.json"
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data))


def test_invalid_json_config_in_source_and_quantized_dir(src_copy, q_copy, tmp_path, capsys):
    (src_copy / "config.json").write_text('{"model_type": "qwen2",\n  "hidden_size": 64,,}')
    assert main(["quantize", str(src_copy), str(tmp_path / "out"), "--no-progress"]) == 2
    _one_line_error(capsys, "config.json", "invalid JSON at line 2")
    (q_copy / "config.json").write_text("{not json")
    assert main(["run", str(q_copy), "hi", *RUN]) == 2
    _one_line_error(capsys, "config.json", "invalid JSON", "re-convert")


def test_wrong_types_in_config(src_copy, q_copy, tmp_path, capsys):
    _edit_config(src_copy, num_hidden_layers="two")
    assert main(["quantize", str(src_copy), str(tmp_path / "out"), "--no-progress"]) == 2
    _one_line_error(capsys, "'num_hidden_layers' is 'two'", "whole number")
    _edit_config(q_copy, rms_norm_eps="small")
    assert main(["run", str(q_copy), "hi", *RUN]) == 2
    _one_line_error(capsys, "'rms_norm_eps'", "must be a number")
    assert main(["plan", str(src_copy / "config.json")]) == 2
    _one_line_error(capsys, "'num_hidden_layers' is 'two'")
    _edit_config(src_copy, num_hidden_layers=2, tie_word_embeddings="yes")
    assert main(["plan", str(src_copy)]) == 2
    _one_line_error(capsys, "transformers cannot read this config", "tie_word_embeddings")


@pytest.mark.parametrize("missing", [("config.json",), ("tokenizer.json", "vocab.json")])
def test_quantized_dir_without_config_or_tokenizer(q_copy, missing, capsys):
    for name in missing:
        (q_copy / name).unlink(missing_ok=True)
    assert main(["run", str(q_copy), "hi", *RUN]) == 2
    _one_line_error(capsys, "config.json" if "config.json" in missing else "no tokenizer files")


def test_empty_prompt(qwen2_q, capsys):
    assert main(["run", str(qwen2_q), "--prompt", "", *RUN]) == 2
    _one_line_error(capsys, "the prompt is empty")
    assert main(["run", str(qwen2_q), *RUN]) == 2
    _one_line_error(capsys, "no prompt")


def test_flash_attention_without_flash_attn(qwen2_q, capsys):
    assert main(["run", str(qwen2_q), "hi", "--attention", "flash_attention_2", *RUN]) == 2
    _one_line_error(capsys, "--attention flash_attention_2", "--attention sdpa")


def test_run_on_a_broken_gguf_file_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    """`run` converts a GGUF file itself (tests/test_cli_models.py); a truncated one is
    refused before anything is written."""
    monkeypatch.setenv("OFFLOAD_ENGINE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert main(["run", str(gguf), "hi", *RUN]) == 2
    _one_line_error(capsys, f"{gguf}: cannot read this GGUF file")
    assert not (tmp_path / "cache" / "converted").exists()


@pytest.mark.parametrize("command", ["run", "plan"])
def test_bare_budget_above_one_needs_a_unit(qwen2_q, command, capsys):
    extra = ["hi", *RUN] if command == "run" else []
    assert main([command, str(qwen2_q), *extra, "--gpu-budget", "1.5"]) == 2
    _one_line_error(capsys, "needs a unit", "1.5GiB")


def test_quantize_checks_dst_before_reading_a_gguf(tmp_path, capsys):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"not really a gguf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "file").write_text("x")
    assert main(["quantize", str(gguf), str(tmp_path / "out"), "--no-progress"]) == 2
    _one_line_error(capsys, "already exists", "--force")


def test_plan_json_into_a_closed_pipe(qwen2_q):
    """`plan --json | head`: no traceback, one line, exit 2. `true` exits at once, so the
    pipe is closed long before plan (which imports torch first) writes to it."""
    shell = (f"{sys.executable} -m offload_engine plan {qwen2_q} --json --hw-profile cpu "
             "| true; echo \"status ${PIPESTATUS[0]}\" >&2")
    proc = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "broken pipe" in proc.stderr and "status 2" in proc.stderr
