"""Inputs that used to end in a traceback (or in exit 0 with nothing written): each now
gives one line and exit 2, before the work where the fault can be seen up front."""

from __future__ import annotations

import io
import struct
import sys

import pytest

from offload_engine.cli import main
from tests import tiny_gguf
from tests.test_data_checks import _one_line_error
from tests.test_import_gguf import llama_f32  # noqa: F401 - a fixture

RUN = ["-n", "2", "--device", "cpu", "--no-progress"]


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the model starts loading."""
    from offload_engine.decode import api

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(api, "load", refuse)


def test_run_with_a_prompt_that_is_not_utf8(qwen2_q, capsys, no_load):
    # argv bytes that are not UTF-8 arrive as surrogates (Python's surrogateescape)
    for prompt in (b"caf\xe9 au lait".decode("utf-8", "surrogateescape"),
                   bytes(range(128, 256)).decode("utf-8", "surrogateescape")):
        assert main(["run", str(qwen2_q), prompt, *RUN]) == 2
        _one_line_error(capsys, "not valid UTF-8", "byte 0x")


def test_chat_line_that_is_not_utf8_is_skipped(qwen2_q, tmp_path, capsys, monkeypatch):
    script = b"\xff\xfe\x00binary\n" + b"hello\n/exit\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(script), encoding="utf-8"))
    monkeypatch.setenv("OFFLOAD_ENGINE_CACHE", str(tmp_path))
    assert main(["chat", str(qwen2_q), "--greedy", "-n", "2", *RUN[2:]]) == 0
    captured = capsys.readouterr()
    assert "(not sent: the line is not valid UTF-8 text" in captured.err
    assert captured.out.count("bot> ") == 1  # the next line is answered


def test_chat_with_stdin_closed(qwen2_q, capsys, monkeypatch, no_load):
    monkeypatch.setattr(sys, "stdin", None)  # what Python sets when fd 0 is closed (<&-)
    assert main(["chat", str(qwen2_q), *RUN[2:]]) == 2
    _one_line_error(capsys, "standard input, which is closed")


@pytest.mark.parametrize("flag", ["--stats-json", "--profile-trace"])
def test_run_output_files_checked_before_loading(qwen2_q, tmp_path, capsys, no_load, flag):
    (tmp_path / "a-file").write_text("x")
    assert main(["run", str(qwen2_q), "hi", *RUN, flag, str(tmp_path)]) == 2
    _one_line_error(capsys, flag, "is a directory")
    assert main(["run", str(qwen2_q), "hi", *RUN, flag, str(tmp_path / "a-file" / "x")]) == 2
    _one_line_error(capsys, flag, "a-file is a file")


def test_run_writes_stats_json_into_a_new_directory(qwen2_q, tmp_path, capsys):
    target = tmp_path / "new" / "stats.json"
    assert main(["run", str(qwen2_q), "hi", *RUN, "--stats-json", str(target)]) == 0
    assert target.is_file()


def test_a_trace_torch_fails_to_write_is_an_error(tmp_path, monkeypatch):
    from torch.profiler import profile

    from offload_engine.errors import ResourceError
    from offload_engine.runtime.profiling import trace_to

    monkeypatch.setattr(profile, "export_chrome_trace", lambda self, path: None)  # as torch
    with pytest.raises(ResourceError, match="could not be written"):
        with trace_to(tmp_path / "trace.json"):
            pass


def test_calibrate_output_checked_before_measuring(tmp_path, capsys, monkeypatch):
    from offload_engine.runtime import calibrate

    def refuse(*args, **kwargs):
        raise AssertionError("measured before the output was checked")

    monkeypatch.setattr(calibrate, "calibrate", refuse)
    (tmp_path / "a-file").write_text("x")
    assert main(["calibrate", "--device", "cpu", "-o", str(tmp_path / "a-file" / "p.toml")]) == 2
    _one_line_error(capsys, "-o/--output", "a-file is a file")


def test_bench_out_dir_and_budgets_checked_before_the_sweep(qwen2_q, tmp_path, capsys,
                                                            monkeypatch):
    from offload_engine.decode import bench

    def refuse(*args, **kwargs):
        raise AssertionError("the sweep started before its flags were checked")

    monkeypatch.setattr(bench, "sweep_points", refuse)
    (tmp_path / "a-file").write_text("x")
    base = ["bench", str(qwen2_q), "--device", "cpu", "--no-progress"]
    assert main([*base, "--out-dir", str(tmp_path / "a-file")]) == 2
    _one_line_error(capsys, "--out-dir", "not a directory")
    assert main([*base, "--out-dir", str(tmp_path / "out"), "--budgets", "min,foo"]) == 2
    err = _one_line_error(capsys, "--budgets", "'foo'")
    assert "--gpu-budget" not in err


def _gguf(tmp_path, llama_f32):  # noqa: F811 - the fixture's value
    return tiny_gguf.write_llama_gguf(tmp_path / "tiny.gguf", llama_f32, linear_types={})


def test_truncated_gguf_says_truncated(tmp_path, llama_f32, capsys):  # noqa: F811
    path = _gguf(tmp_path, llama_f32)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) * 2 // 3])
    assert main(["quantize", str(path), str(tmp_path / "out"), "--no-progress"]) == 2
    err = _one_line_error(capsys, "truncated", "download it again")
    assert "reshape" not in err


def test_gguf_with_an_absurd_tensor_count(tmp_path, llama_f32, capsys):  # noqa: F811
    path = _gguf(tmp_path, llama_f32)
    data = bytearray(path.read_bytes())
    data[8:16] = struct.pack("<Q", 2**62)  # header: magic, version, tensor count, kv count
    path.write_bytes(bytes(data))
    assert main(["quantize", str(path), str(tmp_path / "out"), "--no-progress"]) == 2
    _one_line_error(capsys, f"claims {2**62} tensors", "corrupt")
