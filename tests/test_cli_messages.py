"""Messages that named the wrong cause or the wrong flag: each now says what is wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from offload_engine.cli import main
from tests import tiny
from tests.test_cli_one_line import no_load  # noqa: F401,F811 - a fixture
from tests.test_data_checks import _one_line_error

RUN = ["--device", "cpu", "--no-progress"]


def test_gptq_with_a_wrong_group_size_is_not_called_act_order():
    from offload_engine.errors import QuantizationError
    from offload_engine.quant.gptq_pack import check_g_idx

    written_with_128 = torch.arange(512, dtype=torch.int32) // 128
    with pytest.raises(QuantizationError) as caught:
        check_g_idx(written_with_128, 64, "m.weight")
    assert "runs of 128" in str(caught.value) and "group_size 64" in str(caught.value)
    assert "act-order" not in str(caught.value)
    act_order = written_with_128[torch.randperm(512, generator=torch.Generator().manual_seed(0))]
    with pytest.raises(QuantizationError, match="act-order"):
        check_g_idx(act_order, 128, "m.weight")
    check_g_idx(written_with_128, 128, "m.weight")  # consistent: accepted


@pytest.mark.parametrize("budget", ["0", "00"])
def test_gpu_budget_zero_is_not_called_a_number_above_1(qwen2_q, capsys, budget,
                                                        no_load):  # noqa: F811
    assert main(["run", str(qwen2_q), "hi", "-n", "2", *RUN, "--gpu-budget", budget]) == 2
    err = _one_line_error(capsys, "--gpu-budget", "leaves no memory")
    assert "above 1" not in err


def test_ctx_size_above_the_model_names_the_models_context(qwen2_q, capsys):
    prompt = "word " * 200  # about 200 tokens of a 256-token model
    assert main(["run", str(qwen2_q), prompt, "-n", "100", "-c", "100000", *RUN]) == 2
    err = _one_line_error(capsys, "this model's context of 256 tokens", "-c 100000")
    assert "--ctx-size 256" not in err


@pytest.mark.parametrize("flags,needle", [(["-n", "0"], "-n/--max-new-tokens"),
                                          (["-c", "0"], "-c/--ctx-size")])
def test_n_0_and_c_0_are_refused_before_loading(qwen2_q, capsys, no_load,  # noqa: F811
                                                flags, needle):
    assert main(["run", str(qwen2_q), "hi", *flags, *RUN]) == 2
    _one_line_error(capsys, needle, "at least 1")
    assert main(["chat", str(qwen2_q), *flags, *RUN]) == 2
    _one_line_error(capsys, needle, "at least 1")


@pytest.mark.parametrize("command", ["quantize", "synth", "export"])
def test_shard_size_0_is_refused(command, capsys):
    with pytest.raises(SystemExit) as caught:
        main([command, "a", "b", "--shard-size", "0"])
    assert caught.value.code == 2
    assert "--shard-size: must be at least 1 byte" in capsys.readouterr().err


def test_quantizing_an_already_quantized_directory_says_so(qwen2_q, tmp_path, capsys):
    assert main(["quantize", str(qwen2_q), str(tmp_path / "again"), "--no-progress"]) == 2
    err = _one_line_error(capsys, "already quantized", "offload_manifest.json")
    assert "calibration" not in err


def test_awq_names_the_tensor_with_non_finite_values(tmp_path, tokenizer_dir, capsys):
    from safetensors.torch import load_file, save_file

    src = tiny.make_checkpoint(tmp_path / "src", "llama", tokenizer_dir=tokenizer_dir,
                               shards=1)
    shard = next(src.glob("*.safetensors"))
    tensors = load_file(shard)
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name][0, 0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["quantize", str(src), str(tmp_path / "q"), "--method", "awq",
                 "--calib-samples", "2", "--calib-seq-len", "16", "--no-progress"]) == 2
    err = _one_line_error(capsys, repr(name), "non-finite")
    assert "<tensor>" not in err


@pytest.fixture(scope="module")
def exportable(llama_src, tmp_path_factory):
    from offload_engine.checkpoint.convert import convert
    from offload_engine.quant.layout import QuantSpec

    directory = tmp_path_factory.mktemp("export") / "q"
    convert(llama_src, directory, QuantSpec("int4-asym", 32), progress=False)
    return directory


def test_export_force_replaces_a_previous_export_only(exportable, tmp_path, capsys):
    qwen2_q, exported = exportable, tmp_path / "ct"  # the names the checks below read
    assert main(["export", str(qwen2_q), str(exported), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["export", str(qwen2_q), str(exported), "--no-progress"]) == 2
    _one_line_error(capsys, "already exists", "--force", "`export`")
    before = (exported / "config.json").stat().st_ino
    assert main(["export", str(qwen2_q), str(exported), "--force", "--no-progress"]) == 0
    assert (exported / "config.json").stat().st_ino != before
    capsys.readouterr()
    other = tmp_path / "mine"
    shutil.copytree(exported, other)
    (other / "notes.txt").write_text("my notes")
    assert main(["export", str(qwen2_q), str(other), "--force", "--no-progress"]) == 2
    _one_line_error(capsys, "notes.txt", "only a previous output of `export`")
    assert (other / "notes.txt").read_text() == "my notes"
    not_an_export = tmp_path / "quantized"
    shutil.copytree(qwen2_q, not_an_export)
    assert main(["export", str(qwen2_q), str(not_an_export), "--force", "--no-progress"]) == 2
    _one_line_error(capsys, "only a previous output of `export`")


def test_eval_warns_about_an_unrelated_reference(qwen2_q, qwen2_src, tmp_path, tokenizer_dir,
                                                 capsys):
    flags = ["--tokens", "64", "--greedy-tokens", "4", "--json", *RUN]
    assert main(["eval", str(qwen2_q), "--reference", str(qwen2_src), *flags]) == 0
    assert "warning" not in capsys.readouterr().err
    config = json.loads((qwen2_src / "config.json").read_text())
    other = tiny.make_checkpoint(tmp_path / "other", "qwen2", tokenizer_dir=tokenizer_dir,
                                 seed=7, config=None)
    assert json.loads((other / "config.json").read_text())["vocab_size"] == config["vocab_size"]
    capsys.readouterr()
    assert main(["eval", str(qwen2_q), "--reference", str(other), *flags]) == 0
    err = capsys.readouterr().err
    assert "warning: the reference disagrees" in err and str(other) in err
