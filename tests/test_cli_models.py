"""Models found and converted the way users hold them: run/chat/serve on a GGUF file or an
HF checkpoint (converted once into the cache, then reused), Hugging Face ids and cache
folders, and the `auto` method's choice."""

import io
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from offload_engine.cli import main
from tests import tiny_gguf

RUN = ["-n", "3", "--greedy", "--device", "cpu", "--no-progress"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "engine-cache"
    monkeypatch.setenv("OFFLOAD_ENGINE_CACHE", str(root))
    return root


def _converted_dirs(cache):
    folder = cache / "converted"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def test_run_converts_an_hf_checkpoint_once_then_reuses_it(qwen2_src, tmp_path, cache,
                                                           capsys):
    src = tmp_path / "src"
    shutil.copytree(qwen2_src, src)
    assert main(["run", str(src), "hello", "--method", "rtn", *RUN]) == 0
    err = capsys.readouterr().err
    (target,) = _converted_dirs(cache)
    assert f"converting {src} once into {target}" in err
    assert f"pass {target} directly" in err
    for shard in target.glob("*.safetensors"):  # readable by the group, like the side files
        assert stat.S_IMODE(shard.stat().st_mode) & 0o044 == 0o044, shard
    assert main(["inspect", str(target), "--no-progress"]) == 0
    assert "  method: rtn\n" in capsys.readouterr().out
    assert main(["run", "-m", str(src), "hello", "--method", "rtn", *RUN]) == 0
    err = capsys.readouterr().err
    assert f"using {target}" in err and "converting" not in err
    # other settings, or a changed source, convert again; the old conversion stays usable
    (src / "config.json").write_text((src / "config.json").read_text() + "\n")
    assert main(["run", str(src), "hello", "--method", "rtn", *RUN]) == 0
    assert "converting" in capsys.readouterr().err
    assert len(_converted_dirs(cache)) == 2


def test_serve_and_chat_take_a_source_too(qwen2_src, tmp_path, cache, capsys):
    """serve converts before binding (here the port is taken: exit 2 after converting);
    chat reuses that conversion."""
    import socket

    pytest.importorskip("fastapi")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(qwen2_src), "--method", "rtn", "--port", str(port),
                     "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "converting" in err and "already in use" in err
    result = subprocess.run(
        [sys.executable, "-m", "offload_engine", "chat", str(qwen2_src), "--method", "rtn",
         "-n", "2", "--greedy", "--device", "cpu", "--no-progress"],
        input="hello\n/exit\n", capture_output=True, text=True, timeout=240,
        env={**os.environ, "OFFLOAD_ENGINE_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "note: using" in result.stderr and result.stdout.count("bot> ") == 1


def test_run_converts_a_gguf_that_cannot_be_imported_exactly(llama_src, tmp_path, cache,
                                                             capsys):
    """F16 linears have no exact import: they are quantized again, with a note saying so."""
    path = tiny_gguf.write_llama_gguf(tmp_path / "tiny-f16.gguf", llama_src, linear_types={},
                                      default_type="F16")
    assert main(["run", str(path), "hello", "--method", "rtn", *RUN]) == 0
    err = capsys.readouterr().err
    assert "cannot be imported exactly" in err and "tiny-f16-rtn-int4-asym-g128-" in err
    (target,) = _converted_dirs(cache)
    assert target.name.startswith("tiny-f16-rtn-int4-asym-g128-")


def test_llama_cpp_habits_get_one_line_answers(qwen2_q, capsys):
    assert main(["run", str(qwen2_q), "hi", "-ngl", "99"]) == 2
    err = capsys.readouterr().err
    assert "--gpu-budget" in err and "invalid" not in err and len(err.strip().splitlines()) == 1
    assert main(["run", "-m", str(qwen2_q), str(qwen2_q), "hi"]) == 2
    assert "give the model once" in capsys.readouterr().err
    assert main(["run", "no/such-model-anywhere", "hi"]) == 2
    assert "hf download no/such-model-anywhere" in capsys.readouterr().err


def test_run_chats_by_default_and_takes_prompts_like_llama_cpp(qwen2_q, tmp_path,
                                                               monkeypatch):
    """A model with a chat template answers (the prompt wrapped as a user message) unless
    --raw; the prompt comes positionally, from -f FILE or from stdin."""
    stats = tmp_path / "stats.json"

    def prompt_tokens(*argv):
        assert main(["run", "-m", str(qwen2_q), *argv, *RUN, "--stats-json", str(stats)]) == 0
        return json.loads(stats.read_text())["prompt_tokens"]

    chat, raw = prompt_tokens("hello"), prompt_tokens("hello", "--raw")
    assert chat > raw
    (tmp_path / "prompt.txt").write_text("hello")
    assert prompt_tokens("-f", str(tmp_path / "prompt.txt")) == chat
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello"))
    assert prompt_tokens("--no-chat") == raw


@pytest.mark.parametrize("model_type,parameters,device,expected,says", [
    ("qwen2", 400_000, "cpu", "awq", "--method rtn"),
    ("llama", 135_000_000, "cpu", "rtn", "--method awq"),
    ("llama", 32_000_000_000, "cuda", "awq", "calibrating on cuda"),
    ("gemma3_text", 400_000, "cuda", "rtn", "--method clip"),
])
def test_auto_method_says_what_it_chose_and_why(model_type, parameters, device, expected,
                                                says):
    from types import SimpleNamespace

    from offload_engine.checkpoint.calibrate import CalibrationSettings
    from offload_engine.checkpoint.methods import MethodSettings, choose_method

    asked = MethodSettings("auto", calibration=CalibrationSettings(device=device))
    chosen, note = choose_method(asked, SimpleNamespace(model_type=model_type), parameters)
    assert chosen.name == expected and note.startswith(f"method {expected}: ")
    assert says in note and "\n" not in note
    explicit, nothing = choose_method(MethodSettings("gptq"), None, parameters)
    assert explicit.name == "gptq" and nothing == ""


def _hf_cache(root, repo_id, source):
    """The layout huggingface_hub writes: blobs, a snapshot of symlinks, refs/main."""
    folder = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = folder / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (folder / "blobs").mkdir()
    for index, path in enumerate(sorted(source.iterdir())):
        blob = folder / "blobs" / f"{index:040d}"
        shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    (folder / "snapshots" / ("b" * 40)).mkdir()  # an older, empty snapshot: refs/main decides
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("a" * 40)
    return folder


def test_hf_ids_and_cache_folders_are_found_offline(qwen2_src, tmp_path, monkeypatch,
                                                    capsys):
    """quantize and plan take ORG/NAME from the HF cache, and models--ORG--NAME."""
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    folder = _hf_cache(hub, "tiny-org/tiny-qwen2", qwen2_src)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    assert main(["quantize", "tiny-org/tiny-qwen2", str(tmp_path / "q"), "--method", "rtn",
                 "--no-progress"]) == 0
    assert "a" * 40 in (tmp_path / "q" / "offload_manifest.json").read_text()  # the snapshot
    for model in (str(folder), "tiny-org/tiny-qwen2"):
        assert main(["plan", model, "--hw-profile", "cpu"]) == 0
        assert "fits" in capsys.readouterr().out


def test_run_finds_an_hf_id_in_the_cache_named_by_the_environment(qwen2_src, tmp_path):
    hub = tmp_path / "hub"
    _hf_cache(hub, "tiny-org/tiny-qwen2", qwen2_src)
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1",
           "OFFLOAD_ENGINE_CACHE": str(tmp_path / "engine-cache")}
    result = subprocess.run([sys.executable, "-m", "offload_engine", "run", "tiny-org/tiny-qwen2",
                             "hello", "--method", "rtn", *RUN], env=env, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tiny-org--tiny-qwen2-rtn-int4-asym-g128-" in result.stderr


def test_plan_takes_a_preset_name_and_a_real_32b_config_quietly(tmp_path, capfd):
    """Qwen2.5-32B-Instruct's config.json as published (token ids past the tiny stand-in's
    vocabulary used for counting ops) plans without transformers warnings; the preset
    name `synth` takes plans the same shapes."""
    from offload_engine.model.presets import preset_config

    config = {**preset_config("qwen2.5-32b"), "bos_token_id": 151643, "eos_token_id": 151645,
              "sliding_window": 131072, "use_sliding_window": False, "max_window_layers": 70,
              "torch_dtype": "bfloat16", "use_cache": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    outputs = []
    for model in (str(tmp_path / "config.json"), "qwen2.5-32b"):
        assert main(["plan", model, "--hw-profile", "rtx3090"]) in (0, 1)
        captured = capfd.readouterr()
        assert captured.err == "", captured.err
        outputs.append(captured.out.split("\n", 1)[1])  # after the model line
    assert outputs[0] == outputs[1]


def test_a_long_calibration_announces_its_estimated_time_after_the_first_layer(monkeypatch):
    import time

    from offload_engine.checkpoint import calibrate

    notes = []
    monkeypatch.setattr(calibrate, "LONG_CALIBRATION_S", 0.5)
    for index in calibrate.timed_layers(4, False, notes.append, "awq"):
        if index == 0:
            time.sleep(0.2)  # 4 layers x >= 0.2 s: longer than the threshold
        assert len(notes) == (0 if index == 0 else 1)
    (note,) = notes
    assert note.startswith("awq calibration: about ") and "for 4 layers" in note
    quiet = []
    monkeypatch.setattr(calibrate, "LONG_CALIBRATION_S", 3600)
    assert list(calibrate.timed_layers(3, False, quiet.append, "gptq")) == [0, 1, 2]
    assert quiet == []
