"""Exact AWQ and GPTQ import: codes/zeros/scales recovered from checkpoints packed by the
published layouts (tests/tiny_packed.py cites them), engine logits against transformers
holding the decompressed weights, manifest records, and refusals before work."""

import json

import pytest
import torch

from offload_engine.checkpoint.convert import convert
from offload_engine.checkpoint.format import read_manifest
from offload_engine.errors import QuantizationError, SourceError
from offload_engine.quant import layout
from offload_engine.quant.awq_pack import unpack_awq
from offload_engine.quant.gptq_pack import unpack_gptq
from offload_engine.quant.quantize import dequantize_weight
from tests import tiny, tiny_packed


def _random_group_codes(out_features=24, in_features=256, group_size=64, min_zero=0):
    generator = torch.Generator().manual_seed(0)
    groups = in_features // group_size
    codes = torch.randint(0, 16, (out_features, in_features), generator=generator)
    zeros = torch.randint(min_zero, 16, (out_features, groups), generator=generator)
    scales = (torch.rand(out_features, groups, generator=generator) * 0.1 + 1e-3).half()
    return codes, zeros, scales


def _assert_recovered(weight, codes, zeros, scales, group_size):
    assert weight.spec == layout.QuantSpec("int4-asym", group_size, "fp16")
    assert torch.equal(layout.unpack_int4(weight.qweight).long(), codes)
    assert torch.equal(weight.zeros.long(), zeros)
    assert torch.equal(weight.scales, scales)  # fp16 bit for bit
    expected = tiny_packed.decompressed(codes, zeros, scales, group_size)
    assert torch.equal(dequantize_weight(weight), expected)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_awq_gemm_unpacks_exactly(group_size):
    codes, zeros, scales = _random_group_codes(group_size=group_size)
    parts = tiny_packed.pack_awq(codes, zeros, scales)
    weight = unpack_awq(parts["qweight"], parts["qzeros"], parts["scales"], group_size)
    _assert_recovered(weight, codes, zeros, scales, group_size)


@pytest.mark.parametrize("version", [1, 2])
def test_gptq_unpacks_exactly(version):
    codes, zeros, scales = _random_group_codes(min_zero=1 if version == 1 else 0)
    parts = tiny_packed.pack_gptq(codes, zeros, scales, 64, version)
    weight = unpack_gptq(parts["qweight"], parts["qzeros"], parts["scales"], 64, version,
                         g_idx=parts["g_idx"])
    _assert_recovered(weight, codes, zeros, scales, 64)


def test_unpacking_in_chunks_gives_the_same_codes(monkeypatch):
    from offload_engine.quant import int32_pack

    codes, zeros, scales = _random_group_codes(out_features=32, in_features=512)
    awq = tiny_packed.pack_awq(codes, zeros, scales)
    gptq = tiny_packed.pack_gptq(codes, zeros, scales, 64, version=2)
    whole = (unpack_awq(awq["qweight"], awq["qzeros"], awq["scales"], 64),
             unpack_gptq(gptq["qweight"], gptq["qzeros"], gptq["scales"], 64, 2))
    monkeypatch.setattr(int32_pack, "CHUNK_WORDS", 70)  # many chunks, a short tail
    chunked = (unpack_awq(awq["qweight"], awq["qzeros"], awq["scales"], 64),
               unpack_gptq(gptq["qweight"], gptq["qzeros"], gptq["scales"], 64, 2))
    for a, b in zip(whole, chunked, strict=True):
        assert torch.equal(a.qweight, b.qweight) and torch.equal(a.zeros, b.zeros)
    _assert_recovered(chunked[0], codes, zeros, scales, 64)


def test_gptq_refuses_act_order_and_ambiguous_v1_zeros():
    codes, zeros, scales = _random_group_codes(min_zero=1)
    g_idx = torch.arange(codes.shape[1]).flip(0) // 64
    parts = tiny_packed.pack_gptq(codes, zeros, scales, 64, 1, g_idx)
    with pytest.raises(QuantizationError, match="act-order"):
        unpack_gptq(parts["qweight"], parts["qzeros"], parts["scales"], 64, 1,
                    g_idx=parts["g_idx"])
    zeros[0, 0] = 0  # stored as 15 in v1
    parts = tiny_packed.pack_gptq(codes, zeros, scales, 64, 1)
    with pytest.raises(QuantizationError, match="stored as 15"):
        unpack_gptq(parts["qweight"], parts["qzeros"], parts["scales"], 64, 1)


def _logits_equal_transformers(directory, dense):
    """The engine on DIRECTORY's import against transformers holding the decompressed
    weights."""
    tiny.assert_engine_matches(directory.parent / "q", _reference_model(directory, dense),
                               gpu_budget="1MiB", atol=1e-4, greedy_tokens=0)


def _reference_model(directory, dense):
    """A stock transformers model: fp16 dense tensors of DIRECTORY, decompressed linears."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):  # absent when a side file holds the settings
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config).float().eval()
    state = {k: v.float() for k, v in load_file(directory / "model.safetensors").items()
             if not k.endswith(("qweight", "qzeros", "scales", "g_idx"))}
    state.update(dense)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied: set below
    model.tie_weights()
    return model


CASES = [("awq", 1, 128), ("awq", 1, 64), ("gptq", 1, 128), ("gptq", 2, 64)]


@pytest.mark.parametrize("fmt,version,group_size", CASES)
def test_engine_logits_equal_decompressed_transformers(tmp_path, tokenizer_dir, fmt, version,
                                                       group_size):
    src, dense = tiny_packed.write_checkpoint(tmp_path / "src", fmt, tokenizer_dir,
                                              group_size=group_size, version=version)
    summary = convert(src, tmp_path / "q", progress=False)
    assert summary.quantized == 14 and summary.group_size == group_size
    manifest = read_manifest(tmp_path / "q")
    assert manifest.spec == layout.QuantSpec("int4-asym", group_size, "fp16")
    assert manifest.source["kind"] == fmt and manifest.source["exact"] is True
    expected = (f"awq gemm int4 g{group_size}" if fmt == "awq"
                else f"gptq v{version} int4 g{group_size}")
    assert manifest.source["format"] == expected and manifest.source["requantized"] == []
    _logits_equal_transformers(src, dense)


@pytest.mark.parametrize("fmt,version", [("awq", 1), ("gptq", 1), ("gptq", 2)])
def test_settings_in_the_quantizers_own_file_import_the_same(tmp_path, tokenizer_dir, fmt,
                                                             version):
    """Repositories quantized before the transformers integration keep their settings in
    quantize_config.json (AutoGPTQ) or quant_config.json (AutoAWQ), not in config.json."""
    src, dense = tiny_packed.write_checkpoint(tmp_path / "src", fmt, tokenizer_dir,
                                              group_size=64, version=version)
    tiny_packed.move_settings_to_side_file(src)
    summary = convert(src, tmp_path / "q", progress=False)
    assert summary.quantized == 14 and summary.group_size == 64
    manifest = read_manifest(tmp_path / "q")
    assert manifest.source["kind"] == fmt and manifest.source["exact"] is True
    _logits_equal_transformers(src, dense)


@pytest.mark.parametrize("fields", [{"checkpoint_format": "marlin"},
                                    {"is_marlin_format": True}])
def test_gptq_kernel_layouts_are_refused_before_work(tmp_path, tokenizer_dir, fields):
    src, _ = tiny_packed.write_checkpoint(tmp_path / "src", "gptq", tokenizer_dir)
    tiny_packed.set_config_field(src, **fields)
    with pytest.raises(SourceError, match=r"\(config.json\).*checkpoint_format 'marlin'"):
        convert(src, tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()


def test_an_unknown_method_in_a_side_file_is_refused_naming_the_file(tmp_path,
                                                                     tokenizer_dir):
    src, _ = tiny_packed.write_checkpoint(tmp_path / "src", "gptq", tokenizer_dir)
    tiny_packed.move_settings_to_side_file(src)
    side = src / "quantize_config.json"
    side.write_text(json.dumps({**json.loads(side.read_text()), "quant_method": "hqq"}))
    with pytest.raises(SourceError, match=r"quantize_config.json says .*quant_method 'hqq'"):
        convert(src, tmp_path / "q", progress=False)


def test_float_lm_head_is_quantized_and_recorded_as_not_exact(tmp_path, tokenizer_dir):
    from safetensors.torch import load_file

    from offload_engine.quant.quantize import quantize_weight

    src, dense = tiny_packed.write_checkpoint(tmp_path / "src", "awq", tokenizer_dir,
                                              tied=False)
    convert(src, tmp_path / "q", progress=False)
    manifest = read_manifest(tmp_path / "q")
    assert manifest.source["exact"] is False
    assert manifest.source["requantized"] == ["lm_head.weight"]
    assert manifest.tensors["lm_head.weight"].role == "lm_head"
    assert manifest.tensors["lm_head.weight"].components["scales"].dtype == "F16"
    # the rest is still exact: transformers with the decompressed linears and our
    # quantization of the fp16 lm_head (the import's spec) gives the engine's logits
    lm_head = load_file(src / "model.safetensors")["lm_head.weight"]
    dense["lm_head.weight"] = dequantize_weight(quantize_weight(lm_head, manifest.spec))
    _logits_equal_transformers(src, dense)


@pytest.mark.parametrize("fields,message", [
    ({"version": "gemv"}, "only 'gemm' packing"),
    ({"bits": 8}, "bits 8"),
    ({"zero_point": False}, "zero_point false"),
])
def test_unsupported_awq_settings_are_refused_before_work(tmp_path, tokenizer_dir, fields,
                                                          message):
    src, _ = tiny_packed.write_checkpoint(tmp_path / "src", "awq", tokenizer_dir)
    tiny_packed.set_config_field(src, **fields)
    with pytest.raises(SourceError, match=message):
        convert(src, tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()


def test_gptq_act_order_is_refused_before_work(tmp_path, tokenizer_dir):
    src, _ = tiny_packed.write_checkpoint(tmp_path / "src", "gptq", tokenizer_dir,
                                          act_order=True)
    with pytest.raises(SourceError, match=r"model\.layers\.0\..*act-order"):
        convert(src, tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()


def test_other_quant_methods_are_still_refused(tmp_path, tokenizer_dir):
    src, _ = tiny_packed.write_checkpoint(tmp_path / "src", "awq", tokenizer_dir)
    tiny_packed.set_config_field(src, quant_method="bitsandbytes")
    with pytest.raises(SourceError, match="bitsandbytes"):
        convert(src, tmp_path / "q", progress=False)


def test_cli_quantize_and_inspect_say_what_was_imported(tmp_path, tokenizer_dir, capsys):
    from offload_engine.cli import main

    src, _ = tiny_packed.write_checkpoint(tmp_path / "src", "gptq", tokenizer_dir, version=2)
    assert main(["quantize", str(src), str(tmp_path / "q"), "--no-progress"]) == 0
    assert "imported exactly from gptq v2 int4 g128" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "q"), "--no-progress"]) == 0
    assert "fp16 scales (imported exactly from gptq v2 int4 g128)" in capsys.readouterr().out
    untied, _ = tiny_packed.write_checkpoint(tmp_path / "untied", "awq", tokenizer_dir,
                                             tied=False)
    assert main(["quantize", str(untied), str(tmp_path / "q2"), "--no-progress"]) == 0
    assert "except 1 linear(s) quantized here: lm_head.weight" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "q2"), "--no-progress"]) == 0
    assert "quantized here, from float: lm_head.weight" in capsys.readouterr().out


def test_requantize_dequantizes_and_quantizes_with_the_given_spec(tmp_path, tokenizer_dir):
    src, _ = tiny_packed.write_checkpoint(tmp_path / "src", "awq", tokenizer_dir)
    spec = layout.QuantSpec("int4", 64)
    convert(src, tmp_path / "q", spec, progress=False, requantize=True)
    manifest = read_manifest(tmp_path / "q")
    assert manifest.spec == spec and manifest.source["exact"] is False
    assert manifest.tensors["model.layers.0.mlp.down_proj.weight"].components["scales"] \
        .shape == [128, 4]
