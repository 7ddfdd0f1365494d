"""`export --format compressed-tensors`: the compressed-tensors library's own decompression
of what we write equals our dequantized weights bit for bit; what cannot be expressed is
refused before any work."""

import json

import pytest
import torch

from offload_engine.checkpoint.convert import convert
from offload_engine.checkpoint.export import export_compressed_tensors
from offload_engine.checkpoint.format import read_manifest, verify_directory
from offload_engine.errors import ConversionError
from offload_engine.quant.layout import QuantSpec
from tests import tiny_ct

pytest.importorskip("compressed_tensors")


def _our_weights(directory):
    """name -> our dequantized float32 weight, through the reference dequantizer."""
    from offload_engine.checkpoint.format import load_component
    from offload_engine.quant.quantize import QuantizedWeight, dequantize_weight

    manifest = read_manifest(directory)
    headers, weights = {}, {}
    for name, entry in manifest.tensors.items():
        if entry.quantized:
            parts = {k: load_component(directory, c, headers)
                     for k, c in entry.components.items()}
            weights[name] = dequantize_weight(
                QuantizedWeight.from_parts(parts, manifest.spec, *entry.shape))
    return manifest, weights


@pytest.mark.parametrize("scheme", ["int4", "int4-asym", "int8"])
def test_library_decompression_equals_our_weights(tmp_path, qwen2_src, scheme):
    convert(qwen2_src, tmp_path / "q", QuantSpec(scheme, 32), progress=False)
    summary = export_compressed_tensors(tmp_path / "q", tmp_path / "ct", progress=False)
    assert summary.quantized == 14 and (tmp_path / "ct" / "tokenizer.json").is_file()
    manifest, ours = _our_weights(tmp_path / "q")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["quantization_config"]["ignore"] == ["lm_head"]
    assert config["torch_dtype"] == "bfloat16"
    for name, weight in ours.items():
        module = name[: -len(".weight")]
        if module == "lm_head":  # written dense in the scale dtype (vLLM quantizes Linears)
            from safetensors import safe_open

            shard = next(iter(json.loads((tmp_path / "ct" / "model.safetensors.index.json")
                                         .read_text())["weight_map"].values()))
            with safe_open(tmp_path / "ct" / shard, "pt") as file:
                assert torch.equal(file.get_tensor(name), weight.to(torch.bfloat16))
            continue
        exact = tiny_ct.decompress_module(tmp_path / "ct", module, float32=True)
        assert torch.equal(exact.view(torch.int32), weight.view(torch.int32)), name
        rounded = tiny_ct.decompress_module(tmp_path / "ct", module)  # as the library runs
        assert rounded.dtype == torch.bfloat16
        assert torch.equal(rounded.view(torch.int16), weight.to(torch.bfloat16)
                           .view(torch.int16)), name


@pytest.mark.parametrize("scheme", ["int4", "int4-asym"])
def test_export_then_import_gives_back_the_same_components(tmp_path, llama_src, scheme):
    convert(llama_src, tmp_path / "q", QuantSpec(scheme, 32), progress=False)
    export_compressed_tensors(tmp_path / "q", tmp_path / "ct", progress=False)
    convert(tmp_path / "ct", tmp_path / "back", progress=False)
    before = verify_directory(tmp_path / "q")
    after = verify_directory(tmp_path / "back")
    assert after.spec == before.spec and after.source["exact"] is True
    _, ours = _our_weights(tmp_path / "q")
    _, back = _our_weights(tmp_path / "back")
    assert sorted(ours) == sorted(back)
    for name in ours:
        assert torch.equal(ours[name], back[name]), name


def test_what_compressed_tensors_cannot_hold_is_refused(tmp_path, qwen2_src, llama_src):
    from tests import tiny_gguf

    convert(qwen2_src, tmp_path / "g64", QuantSpec("int4", 64), progress=False)
    with pytest.raises(ConversionError, match="160 inputs, not a multiple of the group size"):
        export_compressed_tensors(tmp_path / "g64", tmp_path / "ct", progress=False)
    # an F32 embedding stays tied (a Q8_0 one would add an int8 output: a second scheme)
    gguf_path = tiny_gguf.write_llama_gguf(tmp_path / "t.gguf", llama_src, linear_types={},
                                           default_type="Q4_1", embedding_type="F32")
    convert(gguf_path, tmp_path / "q4_1", progress=False)
    with pytest.raises(ConversionError, match="int4-min.*no compressed-tensors form"):
        export_compressed_tensors(tmp_path / "q4_1", tmp_path / "ct", progress=False)
    assert not (tmp_path / "ct").exists()


def test_cli_export(tmp_path, llama_src, capsys):
    from offload_engine.cli import main

    convert(llama_src, tmp_path / "q", QuantSpec("int4-asym", 32), progress=False)
    argv = ["export", str(tmp_path / "q"), str(tmp_path / "ct"), "--format",
            "compressed-tensors", "--no-progress"]
    assert main(argv) == 0
    assert "pack-quantized" in capsys.readouterr().out
    assert main(argv) == 2  # DST exists now
    assert "already exists" in capsys.readouterr().err


def test_transformers_loads_the_export_with_the_same_weights(tmp_path, qwen2_src):
    """transformers' own compressed-tensors loader (the library decompresses on the first
    forward) reads our config, index and shards: every weight is ours, in bf16."""
    from transformers import AutoModelForCausalLM

    convert(qwen2_src, tmp_path / "q", QuantSpec("int4", 32), progress=False)
    export_compressed_tensors(tmp_path / "q", tmp_path / "ct", progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()
    with torch.no_grad():
        model(torch.tensor([[1, 5, 9, 30]]))  # decompresses every linear
    _, ours = _our_weights(tmp_path / "q")
    for name, weight in ours.items():
        loaded = model.get_parameter(name)
        assert torch.equal(loaded.view(torch.int16), weight.to(torch.bfloat16)
                           .view(torch.int16)), name


def test_transformers_loads_the_export_of_a_tied_model(tmp_path, llama_src):
    """A tied lm_head is the embedding: it is listed in `ignore` (not a quantized Linear
    missing its packed weight), transformers ties it, and every linear is ours."""
    from transformers import AutoModelForCausalLM

    convert(llama_src, tmp_path / "q", QuantSpec("int4", 32), progress=False)
    export_compressed_tensors(tmp_path / "q", tmp_path / "ct", progress=False)
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert "lm_head" in config["quantization_config"]["ignore"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 30]])).logits  # decompresses every linear
    assert torch.isfinite(logits).all()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    _, ours = _our_weights(tmp_path / "q")
    for name, weight in ours.items():
        assert torch.equal(model.get_parameter(name).to(torch.float32),
                           weight.to(torch.bfloat16).to(torch.float32)), name
