"""Pre-quantized mixture-of-experts checkpoints (per-expert packed linears) imported exactly.

Tiny random Qwen3-MoE, Mixtral and OLMoE models (2 layers, 4 experts, top-2) saved with
save_pretrained (per-expert keys, as hub checkpoints keep them), then compressed by the
compressed-tensors library itself (tests/tiny_ct.py) or packed by the published AWQ/GPTQ
layouts (tests/tiny_packed.py). Our imported weights must dequantize to exactly what the
library decompresses (or the packer started from), merged into the fused experts
parameters by transformers' own conversion; the engine's logits must equal a stock
transformers model holding those weights, at the minimum and unbounded budgets.
"""

import pytest
import torch

from offload_engine.checkpoint.convert import convert
from offload_engine.checkpoint.format import read_manifest
from offload_engine.errors import ConversionError
from offload_engine.quant.layout import QuantSpec
from tests import tiny, tiny_ct, tiny_packed

pytest.importorskip("compressed_tensors")


def _moe_src(tmp_path, tokenizer_dir, arch):
    # Qwen3-MoE's experts are 48 wide by default: 64 makes whole groups of 32
    config = tiny.tiny_moe_config(arch, **({"moe_intermediate_size": 64}
                                           if arch == "qwen3_moe" else {}))
    return tiny.make_checkpoint(tmp_path / "src", config=config, tokenizer_dir=tokenizer_dir,
                                shards=1)


def _ct_weights(ct):
    """{checkpoint weight key: the library's decompression in float32} of every module."""
    from safetensors import safe_open

    with safe_open(ct / "model.safetensors", "pt") as file:
        modules = [k[:-len(".weight_packed")] for k in file.keys()
                   if k.endswith(".weight_packed")]
    return {f"{m}.weight": tiny_ct.decompress_module(ct, m, float32=True) for m in modules}


def _check_exact_import(src, imported_dir, theirs, tmp_path):
    """Every tensor equal bit for bit, experts included, then logits and greedy tokens."""
    manifest = read_manifest(imported_dir)
    assert manifest.source["exact"] is True and manifest.source["requantized"] == []
    experts = [e for e in manifest.tensors.values() if e.role == "expert"]
    assert len(experts) == 2 * 4 * 2 and all(e.quantized for e in experts)
    assert not any(e.quantized for n, e in manifest.tensors.items() if ".gate." in n)
    reference = tiny.model_with_weights(src, theirs, tmp_path / "reference")
    ours = tiny.dequantized_reference(src, imported_dir).state_dict()
    for name, value in reference.state_dict().items():
        assert torch.equal(ours[name].view(torch.int32), value.view(torch.int32)), name
    for budget in ("unbounded", tiny.moe_minimum_budget(imported_dir)):
        tiny.assert_engine_matches(imported_dir, reference, gpu_budget=budget, atol=1e-4)


@pytest.mark.parametrize("arch,symmetric", [("qwen3_moe", True), ("mixtral", False)])
def test_compressed_tensors_moe_imports_exactly(tmp_path, tokenizer_dir, arch, symmetric):
    src = _moe_src(tmp_path, tokenizer_dir, arch)
    ct = tiny_ct.make_ct_checkpoint(src, tmp_path / "ct", "group", symmetric, 32,
                                    dtype=torch.float16)
    summary = convert(ct, tmp_path / "q", progress=False)
    assert summary.imported.startswith("compressed-tensors")
    assert read_manifest(tmp_path / "q").spec == QuantSpec(
        "int4" if symmetric else "int4-asym", 32, "fp16")
    _check_exact_import(src, tmp_path / "q", _ct_weights(ct), tmp_path)


@pytest.mark.parametrize("fmt,version,arch", [("awq", 1, "qwen3_moe"), ("gptq", 1, "mixtral"),
                                              ("gptq", 2, "olmoe")])
def test_awq_and_gptq_moe_import_exactly(tmp_path, tokenizer_dir, fmt, version, arch):
    src = _moe_src(tmp_path, tokenizer_dir, arch)
    dense = tiny_packed.pack_checkpoint(src, tmp_path / fmt, fmt, 32, version)
    summary = convert(tmp_path / fmt, tmp_path / "q", progress=False)
    assert summary.imported.startswith(fmt)
    _check_exact_import(src, tmp_path / "q", dense, tmp_path)


def test_a_float_expert_in_an_import_is_recorded_as_not_exact(tmp_path, tokenizer_dir):
    """An expert left in float (a quantizer's ignore list) is quantized here: named, and
    the manifest says the import is not exact."""
    src = _moe_src(tmp_path, tokenizer_dir, "qwen3_moe")
    ct = tiny_ct.make_ct_checkpoint(src, tmp_path / "ct", "group", True, 32)
    from safetensors.torch import load_file, save_file

    state = load_file(ct / "model.safetensors")
    for expert_matrix in ("gate_proj", "up_proj", "down_proj"):
        module = f"model.layers.1.mlp.experts.2.{expert_matrix}"
        for part in ("weight_packed", "weight_scale", "weight_shape"):
            del state[f"{module}.{part}"]
        state[f"{module}.weight"] = load_file(src / "model.safetensors")[f"{module}.weight"]
    save_file(state, str(ct / "model.safetensors"))
    convert(ct, tmp_path / "q", progress=False)
    source = read_manifest(tmp_path / "q").source
    assert source["exact"] is False
    assert source["requantized"] == ["model.layers.1.mlp.experts.down_proj.2.weight",
                                     "model.layers.1.mlp.experts.gate_up_proj.2.weight"]


def test_an_expert_mixing_float_and_quantized_pieces_is_refused(tmp_path, tokenizer_dir):
    src = _moe_src(tmp_path, tokenizer_dir, "qwen3_moe")
    ct = tiny_ct.make_ct_checkpoint(src, tmp_path / "ct", "group", True, 32)
    from safetensors.torch import load_file, save_file

    state = load_file(ct / "model.safetensors")
    module = "model.layers.0.mlp.experts.1.up_proj"
    for part in ("weight_packed", "weight_scale", "weight_shape"):
        del state[f"{module}.{part}"]
    state[f"{module}.weight"] = load_file(src / "model.safetensors")[f"{module}.weight"]
    save_file(state, str(ct / "model.safetensors"))
    with pytest.raises(ConversionError, match="up_proj.weight is stored in float"):
        convert(ct, tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()


def test_a_merge_that_moves_columns_is_refused(tmp_path, tokenizer_dir, monkeypatch):
    """Only merges of whole rows keep groups intact; the row map checks every column of
    the converter's output, so a converter that moved columns would be refused."""
    from offload_engine.checkpoint.keymap import KeyMap

    src = _moe_src(tmp_path, tokenizer_dir, "qwen3_moe")
    ct = tiny_ct.make_ct_checkpoint(src, tmp_path / "ct", "group", True, 32)
    run = KeyMap._run_converter
    monkeypatch.setattr(KeyMap, "_run_converter",
                        lambda self, group, pieces: run(self, group, pieces).flip(-1))
    with pytest.raises(ConversionError, match="other than by whole rows"):
        convert(ct, tmp_path / "q", progress=False)
