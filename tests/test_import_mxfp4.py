"""MXFP4 (gpt-oss's experts; GGUF type 39): the raw-block scheme ``mxfp4`` against gguf-py's
and transformers' dequantizers, and a tiny gpt-oss checkpoint whose experts gguf-py
quantized, imported exactly (tests/tiny_mxfp4.py)."""

import json

import numpy as np
import pytest
import torch

from offload_engine.checkpoint.convert import convert
from offload_engine.checkpoint.format import read_manifest
from offload_engine.errors import ConversionError, SourceError
from offload_engine.model.experts import find_experts, split_expert_name
from offload_engine.quant import block_formats, mxfp4
from offload_engine.quant.layout import QuantSpec
from offload_engine.quant.quantize import dequantize_weight
from offload_engine.runtime.store import HostStore
from tests import tiny, tiny_mxfp4

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize  # noqa: E402

FMT = block_formats.FORMATS["mxfp4"]


def _same_bits(ours: torch.Tensor, theirs: np.ndarray) -> bool:
    return np.array_equal(ours.numpy().view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("scale", [0.05, 2e3, 1e-38])  # ordinary, large, subnormal scales
def test_random_blocks_dequantize_as_gguf_py(scale):
    rows = block_formats.random_rows(FMT, 9, 96, torch.Generator().manual_seed(1), scale)
    theirs = dequantize(rows.numpy(), gguf.GGMLQuantizationType.MXFP4)
    assert _same_bits(block_formats.dequantize_rows(FMT, rows, 96), theirs)


def test_quantized_blocks_dequantize_as_gguf_py_and_transformers():
    """Blocks from gguf-py's quantizer; laid out as gpt-oss stores them, transformers'
    dequantizer reads the same values (its -0.0 for code 8 compares equal to our +0)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    values = (np.random.default_rng(3).standard_normal((6, 128)) * 0.2).astype(np.float32)
    values[2, :32] = 0
    rows = tiny_mxfp4.gguf_blocks(values)
    ours = block_formats.dequantize_rows(FMT, torch.from_numpy(rows), 128)
    assert _same_bits(ours, dequantize(rows, gguf.GGMLQuantizationType.MXFP4))
    blocks, scales = (torch.from_numpy(t) for t in tiny_mxfp4.gpt_oss_layout(rows))
    weight = mxfp4.import_expert(blocks, scales)
    assert torch.equal(weight.qweight, torch.from_numpy(rows))  # gguf-py's bytes, as they are
    theirs = convert_moe_packed_tensors(blocks[None], scales[None], dtype=torch.float32)
    assert torch.equal(dequantize_weight(weight), theirs[0].t())
    assert all(torch.equal(a, b) for a, b in zip(mxfp4.gpt_oss_tensors(weight.qweight),
                                                 (blocks, scales), strict=True))


def test_exponent_255_is_a_non_finite_scale():
    rows = block_formats.random_rows(FMT, 2, 64, torch.Generator().manual_seed(2))
    rows[1, 17] = 255  # second block of row 1
    assert torch.isnan(block_formats.block_scales(FMT, rows)).sum() == 1
    assert torch.isnan(block_formats.dequantize_rows(FMT, rows, 64)[1, 32:]).all()


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory, tokenizer_dir):
    """(dense source, MXFP4 checkpoint, gguf-py's dequantized experts, imported directory)."""
    root = tmp_path_factory.mktemp("gpt_oss")
    src = tiny.make_checkpoint(root / "src", config=tiny.tiny_arch_config("gpt_oss"),
                               tokenizer_dir=tokenizer_dir, shards=1)
    expected = tiny_mxfp4.write_mxfp4_checkpoint(src, root / "mx")
    convert(root / "mx", root / "q", progress=False)
    return src, root / "mx", expected, root / "q"


def test_gpt_oss_experts_import_exactly(gpt_oss):
    _, mx, expected, directory = gpt_oss
    manifest = read_manifest(directory)
    assert manifest.spec == QuantSpec("mxfp4", 32, "fp16")
    experts = {n: e for n, e in manifest.tensors.items() if e.role == "expert"}
    assert len(experts) == 2 * 4 * 2 and all(e.quant is None for e in experts.values())
    # attention and lm_head are bf16 in gpt-oss: quantized here, and said so
    assert manifest.source["exact"] is False
    assert "lm_head.weight" in manifest.source["requantized"]
    assert not any(".experts." in n for n in manifest.source["requantized"])
    assert "quantization_config" not in json.loads((directory / "config.json").read_text())
    theirs = tiny_mxfp4.transformers_dequantized(mx)
    params = dict(theirs.named_parameters())
    infos = find_experts(theirs)
    for name, weight in HostStore.load(directory, progress=False).items():
        found = split_expert_name(name, infos)
        if found is None:
            continue
        info, matrix, expert = found
        ours = dequantize_weight(weight)
        fused = f"{info.module_name}.{matrix.param}"
        assert _same_bits(ours, expected[fused][expert].numpy()), name  # gguf-py's
        assert torch.equal(ours, params[fused][expert].t()), name  # transformers' loader


def test_gpt_oss_logits_equal_transformers_holding_the_dequantized_weights(gpt_oss):
    """transformers' own MXFP4 load (experts dequantized by it), with the attention and
    lm_head we quantized to int8 put in: the engine's logits and greedy tokens equal it."""
    _, mx, _, directory = gpt_oss
    reference = tiny_mxfp4.transformers_dequantized(mx)
    params = dict(reference.named_parameters())
    requantized = set(read_manifest(directory).source["requantized"])
    with torch.no_grad():
        for name, weight in HostStore.load(directory, progress=False).items():
            if f"{name}.weight" in requantized:
                params[f"{name}.weight"].copy_(dequantize_weight(weight))
    for budget in ("unbounded", tiny.moe_minimum_budget(directory)):
        tiny.assert_engine_matches(directory, reference, gpu_budget=budget, atol=1e-4)


def test_requantize_dequantizes_the_experts(gpt_oss, tmp_path):
    _, mx, _, _ = gpt_oss
    convert(mx, tmp_path / "q", QuantSpec("int4", 32), progress=False, requantize=True)
    manifest = read_manifest(tmp_path / "q")
    assert manifest.spec == QuantSpec("int4", 32) and manifest.source["exact"] is False
    assert sum(e.role == "expert" for e in manifest.tensors.values()) == 16


def test_export_refuses_mxfp4_experts(gpt_oss, tmp_path):
    from offload_engine.checkpoint.export import export_compressed_tensors

    # the int8 attention comes first in the manifest: refused as a mix of specs, or the
    # experts as blocks with no compressed-tensors form
    with pytest.raises(ConversionError, match="other tensors as mxfp4|MXFP4 blocks.*e2m1"):
        export_compressed_tensors(gpt_oss[3], tmp_path / "ct", progress=False)
    assert not (tmp_path / "ct").exists()


def test_damaged_mxfp4_checkpoints_are_refused(gpt_oss, tmp_path):
    from safetensors.torch import load_file, save_file

    _, mx, _, _ = gpt_oss
    state = load_file(mx / "model.safetensors")
    key = "model.layers.1.mlp.experts.down_proj_scales"
    state[key][2, 5, 1] = 255  # a NaN exponent
    bad = tmp_path / "nan"
    bad.mkdir()
    for path in mx.iterdir():
        if path.suffix != ".safetensors":
            (bad / path.name).write_bytes(path.read_bytes())
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(ConversionError, match="down_proj.2.weight.*non-finite scales"):
        convert(bad, tmp_path / "q", progress=False)
    del state[key]
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(SourceError, match="down_proj has .*_blocks without its scales"):
        convert(bad, tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()


def test_a_gguf_with_mxfp4_linears_imports_exactly(tmp_path, llama_src):
    """GGUF's own MXFP4 tensors (gguf-py's quantizer) are the same raw blocks: copied, and
    the engine's logits equal transformers' on the GGUF (which dequantizes with gguf-py)."""
    from transformers import AutoModelForCausalLM

    from tests import tiny_gguf

    types = {"blk.0.ffn_down.weight": "MXFP4", "blk.1.attn_q.weight": "MXFP4"}
    path = tiny_gguf.write_llama_gguf(tmp_path / "m.gguf", llama_src, types, "Q4_0")
    convert(path, tmp_path / "q", progress=False)
    manifest = read_manifest(tmp_path / "q")
    assert manifest.source["exact"] is True
    assert {n for n, e in manifest.tensors.items() if e.quant} == {  # + the untied Q8_0 output
        "model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight",
        "lm_head.weight"}
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf",
                                                     dtype=torch.float32).eval()
    tiny.assert_engine_matches(tmp_path / "q", reference, gpu_budget=tiny.GGUF_STREAMING_BUDGET)
