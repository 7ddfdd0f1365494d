"""compressed-tensors pack-quantized W4A16: the packing against the compressed-tensors
library's own packer, and import of checkpoints the library compressed, against the
library's own decompression and a transformers model holding those weights."""

import json

import pytest
import torch

from offload_engine.checkpoint.convert import convert
from offload_engine.checkpoint.format import read_manifest
from offload_engine.errors import SourceError
from offload_engine.quant import ct_pack
from offload_engine.quant.layout import QuantSpec
from offload_engine.quant.quantize import dequantize_weight
from tests import tiny, tiny_ct

pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.helpers import (  # noqa: E402
    pack_to_int32,
    unpack_from_int32,
)

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
CASES = [("group", True, 32), ("group", False, 32), ("channel", True, None),
         ("channel", False, None)]


@pytest.mark.parametrize("columns", [8, 40, 37, 1])
def test_packing_matches_the_library(columns):
    torch.manual_seed(columns)
    values = torch.randint(-8, 8, (13, columns), dtype=torch.int8)  # every signed value
    theirs = pack_to_int32(values, 4)
    ours = ct_pack.pack_codes((values + 8).to(torch.uint8))
    assert ours.dtype == torch.int32 and torch.equal(ours, theirs)
    assert torch.equal(ct_pack.unpack_codes(theirs, columns).to(torch.int8) - 8, values)
    assert torch.equal(unpack_from_int32(ours, 4, values.shape), values)
    # zero points are packed along the output dimension
    zeros = pack_to_int32(values, 4, packed_dim=0)
    assert torch.equal(ct_pack.pack_codes((values + 8).to(torch.uint8).t()).t(), zeros)


def _module_names(config: dict):
    layers = range(config["num_hidden_layers"])
    names = [f"model.layers.{i}.{linear}" for i in layers for linear in LINEARS]
    return names + ([] if config.get("tie_word_embeddings") else ["lm_head"])


@pytest.mark.parametrize("strategy,symmetric,group_size", CASES)
def test_import_equals_the_library_decompression(tmp_path, qwen2_src, strategy, symmetric,
                                                 group_size):
    ct = tiny_ct.make_ct_checkpoint(qwen2_src, tmp_path / "ct", strategy, symmetric,
                                    group_size)
    source_names = _module_names(json.loads((ct / "config.json").read_text()))
    from offload_engine.checkpoint.sources import open_source

    source = open_source(ct)
    imported = {name: weight for name, weight in source.iter_tensors()
                if not isinstance(weight, torch.Tensor)}
    assert sorted(imported) == sorted(f"{n}.weight" for n in source_names)
    expected_group = group_size or 32  # channel: largest group dividing 64 and 160
    scheme = "int4" if symmetric else "int4-asym"
    assert source.import_spec == QuantSpec(scheme, expected_group, "bf16")
    for module in source_names:
        theirs = tiny_ct.decompress_module(ct, module)  # bf16, computed in bf16
        ours = dequantize_weight(imported[f"{module}.weight"])  # float32, exact products
        assert torch.equal(ours.to(theirs.dtype).view(torch.int16),
                           theirs.view(torch.int16)), module
        exact = tiny_ct.decompress_module(ct, module, float32=True)
        assert torch.equal(ours.view(torch.int32), exact.view(torch.int32)), module


def test_fp16_scales_stay_fp16(tmp_path, llama_src):
    ct = tiny_ct.make_ct_checkpoint(llama_src, tmp_path / "ct", "group", False, 32,
                                    dtype=torch.float16)
    convert(ct, tmp_path / "q", progress=False)
    manifest = read_manifest(tmp_path / "q")
    assert manifest.spec == QuantSpec("int4-asym", 32, "fp16")
    assert manifest.source["exact"] is True
    assert manifest.source["format"] == ("compressed-tensors pack-quantized W4A16 group 32 "
                                         "asymmetric")
    assert "quantization_config" not in json.loads((tmp_path / "q" / "config.json").read_text())


def _reference_model(dense_src, ct, names):
    """A stock transformers model whose linears hold the library's decompressed weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dense_src, dtype=torch.float32).eval()
    state = {f"{n}.weight": tiny_ct.decompress_module(ct, n, float32=True) for n in names}
    model.load_state_dict(state, strict=False)
    return model


@pytest.mark.parametrize("strategy,symmetric,group_size", [CASES[1], CASES[2]])
def test_engine_logits_equal_transformers_with_decompressed_weights(
        tmp_path, qwen2_src, strategy, symmetric, group_size):

    ct = tiny_ct.make_ct_checkpoint(qwen2_src, tmp_path / "ct", strategy, symmetric,
                                    group_size, dtype=torch.float16)
    summary = convert(ct, tmp_path / "q", progress=False)
    assert summary.imported.startswith("compressed-tensors") and summary.quantized == 15
    reference = _reference_model(qwen2_src, ct,
                                 _module_names(json.loads((ct / "config.json").read_text())))
    tiny.assert_engine_matches(tmp_path / "q", reference)


def _edit_quantization(ct, **changes):
    config = json.loads((ct / "config.json").read_text())
    config["quantization_config"].update(changes)
    (ct / "config.json").write_text(json.dumps(config))


def test_unsupported_settings_are_refused_before_work(tmp_path, llama_src):
    ct = tiny_ct.make_ct_checkpoint(llama_src, tmp_path / "ct", "group", True, 32)
    _edit_quantization(ct, format="naive-quantized")
    with pytest.raises(SourceError, match="format 'naive-quantized'"):
        convert(ct, tmp_path / "q", progress=False)
    config = json.loads((ct / "config.json").read_text())
    group = config["quantization_config"]["config_groups"]["group_0"]
    group["weights"]["num_bits"] = 8
    group["input_activations"] = {"num_bits": 8, "type": "int"}
    _edit_quantization(ct, format="pack-quantized", config_groups={"group_0": group})
    with pytest.raises(SourceError, match="8-bit weights.*only int 4-bit|activations"):
        convert(ct, tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()


def test_an_unquantized_linear_is_quantized_here_and_recorded(tmp_path, qwen2_src):
    """lm_head in the ignore list of an untied model (as llm-compressor writes Qwen2.5
    W4A16): our format holds it quantized, so it is quantized here, as for AWQ/GPTQ."""
    ct = tiny_ct.make_ct_checkpoint(qwen2_src, tmp_path / "ct", "group", True, 32)
    from safetensors.torch import load_file, save_file

    state = load_file(ct / "model.safetensors")
    for part in ("weight_packed", "weight_scale", "weight_shape"):
        del state[f"lm_head.{part}"]
    state["lm_head.weight"] = torch.randn(512, 64).to(torch.bfloat16)
    save_file(state, str(ct / "model.safetensors"))
    summary = convert(ct, tmp_path / "q", progress=False)
    source = read_manifest(tmp_path / "q").source
    assert source["requantized"] == ["lm_head.weight"] and source["exact"] is False
    assert "lm_head.weight" in " ".join(summary.lines())
    manifest = read_manifest(tmp_path / "q")
    assert manifest.tensors["lm_head.weight"].quantized  # held quantized, like every linear
