"""GGUF K-quants (and Q5_0/Q5_1) held as raw blocks: the unpacking against gguf-py bit for
bit, sizes, and a file mixing every exact type (as llama.cpp's Q4_K_M does) imported,
run, evaluated, planned and refused for export."""

import json

import numpy as np
import pytest
import torch

from offload_engine.checkpoint.convert import convert
from offload_engine.checkpoint.format import read_manifest
from offload_engine.errors import ConfigError, ConversionError, QuantizationError, SourceError
from offload_engine.quant import block_formats
from offload_engine.quant.gguf_blocks import EXACT_TYPES, import_rows
from offload_engine.quant.layout import QuantSpec
from offload_engine.quant.quantize import dequantize_weight, quantize_weight
from tests import tiny, tiny_gguf

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize  # noqa: E402

RAW_TYPES = sorted(block_formats.BY_GGML_TYPE)
# no quantizer here writes Q2_K/Q3_K (gguf-py cannot): those are checked on random blocks
WRITTEN_TYPES = sorted(set(RAW_TYPES) - {"Q2_K", "Q3_K"})


def _same_bits(ours: np.ndarray, theirs: np.ndarray) -> bool:
    return ours.shape == theirs.shape and np.array_equal(ours.view(np.uint32),
                                                         theirs.view(np.uint32))


@pytest.mark.parametrize("type_name", RAW_TYPES)
@pytest.mark.parametrize("scale", [0.05, 2e3, 1e-6])  # ordinary, large, subnormal d
def test_random_blocks_unpack_bit_exact(type_name, scale):
    fmt = block_formats.BY_GGML_TYPE[type_name]
    rows, k = 9, 3 * fmt.block_elements
    raw = block_formats.random_rows(fmt, rows, k, torch.Generator().manual_seed(1), scale)
    weight = import_rows(type_name, raw.numpy(), k)
    assert weight.spec.raw_blocks and weight.scales is None
    assert torch.equal(weight.qweight, raw)  # the file's bytes, as they are
    theirs = dequantize(raw.numpy(), gguf.GGMLQuantizationType[type_name])
    assert _same_bits(dequantize_weight(weight).numpy(), theirs), type_name


@pytest.mark.parametrize("type_name", WRITTEN_TYPES)
def test_written_blocks_unpack_bit_exact(type_name):
    """Blocks from a quantizer (gguf-py's for Q5_0/Q5_1, tests/tiny_gguf.py's K-quant
    writers) rather than random bytes: structured codes, zero sub-blocks."""
    rng = np.random.default_rng(2)
    values = (rng.standard_normal((5, 512)) * 0.2).astype(np.float32)
    values[1, :64] = 0
    raw = tiny_gguf.quantize(values, type_name)
    theirs = dequantize(raw, gguf.GGMLQuantizationType[type_name])
    assert _same_bits(dequantize_weight(import_rows(type_name, raw, 512)).numpy(), theirs)


def test_unpacking_in_chunks_equals_one_piece(monkeypatch):
    for fmt in block_formats.FORMATS.values():
        rows = block_formats.random_rows(fmt, 7, 2 * fmt.block_elements,
                                         torch.Generator().manual_seed(4))
        whole = block_formats.dequantize_rows(fmt, rows, 2 * fmt.block_elements)
        with monkeypatch.context() as patch:
            patch.setattr(block_formats, "CHUNK_ELEMENTS", 3 * fmt.block_elements)
            chunked = block_formats.dequantize_rows(fmt, rows, 2 * fmt.block_elements)
        assert torch.equal(whole, chunked), fmt.ggml_type


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K"])
def test_k_min_writer_is_read_back_by_gguf_py(type_name):
    """tests/tiny_gguf.py writes Q4_K/Q5_K itself (gguf-py cannot): gguf-py reads them back
    within about half a step of each sub-block's range (the 6-bit sub-scales round)."""
    rng = np.random.default_rng(7)
    values = (rng.standard_normal((6, 512)) * 0.1).astype(np.float32)
    raw = tiny_gguf.quantize(values, type_name)
    assert raw.shape == (6, 2 * EXACT_TYPES[type_name].block_bytes) and raw.dtype == np.uint8
    read = dequantize(raw, gguf.GGMLQuantizationType[type_name])
    sub = values.reshape(6, -1, 32)
    step = (sub.max(-1) - np.minimum(sub.min(-1), 0)) / (15 if type_name == "Q4_K" else 31)
    assert (np.abs(read - values).reshape(6, -1, 32).max(-1) <= step * 0.55).all()


@pytest.mark.parametrize(("type_name", "bytes_per_param"), [
    ("Q4_K", 0.5625), ("Q5_K", 0.6875), ("Q6_K", 0.8203125), ("Q5_0", 0.6875),
    ("Q5_1", 0.75), ("Q2_K", 0.328125), ("Q3_K", 0.4296875), ("Q4_0", 0.5625),
    ("Q4_1", 0.625), ("Q8_0", 1.0625)])
def test_bytes_per_parameter_are_the_files(type_name, bytes_per_param):
    block_type = EXACT_TYPES[type_name]
    assert block_type.bytes_per_param == bytes_per_param
    assert block_type.spec.nbytes(64, 1024) == 64 * 1024 * bytes_per_param


def test_raw_block_specs_are_checked_and_never_quantized_to():
    with pytest.raises(ConfigError, match="Q4_K blocks: group size 256 with fp16"):
        QuantSpec("gguf-q4_k", 128, "fp16")
    with pytest.raises(QuantizationError, match="imported, never quantized here"):
        quantize_weight(torch.randn(4, 256), QuantSpec("gguf-q6_k", 256, "fp16"))
    with pytest.raises(QuantizationError, match="do not hold 300 Q4_K elements"):
        import_rows("Q4_K", np.zeros((2, 144), np.uint8), 300)


def test_gateway_reference_is_dequantize_then_matmul():
    from offload_engine.kernels import gateway

    fmt = block_formats.FORMATS["gguf-q5_k"]
    raw = block_formats.random_rows(fmt, 12, 512, torch.Generator().manual_seed(3))
    weight = import_rows("Q5_K", raw, 512)
    x = torch.randn(3, 512)
    dense = torch.from_numpy(dequantize(raw.numpy(), gguf.GGMLQuantizationType.Q5_K))
    assert gateway.kernel_path(x, weight) == gateway.REFERENCE
    torch.testing.assert_close(gateway.quantized_linear(x, weight), x @ dense.T,
                               rtol=0, atol=0)


# ----- a file mixing every exact type, as llama.cpp's Q4_K_M mixes Q4_K, Q6_K, Q5_0, Q8_0
# Layer 0 holds the K-quants, layer 1 the legacy types; the output matrix is Q6_K.
MIXED_TYPES = {
    "blk.0.attn_v.weight": "Q6_K", "blk.0.ffn_down.weight": "Q6_K",
    "blk.0.ffn_up.weight": "Q5_K",
    "blk.1.attn_q.weight": "Q4_1", "blk.1.attn_k.weight": "Q4_0",
    "blk.1.attn_v.weight": "Q8_0", "blk.1.ffn_gate.weight": "Q5_0",
    "blk.1.ffn_up.weight": "Q5_0", "blk.1.ffn_down.weight": "Q5_1",
    "output.weight": "Q6_K",
}


@pytest.fixture(scope="module")
def llama_256(tmp_path_factory, tokenizer_dir):
    """A tiny random Llama with its own lm_head and hidden 256 (K-quant rows are whole
    256-element super-blocks)."""
    config = tiny.tiny_config("llama", intermediate_size=512)
    config.hidden_size, config.head_dim, config.tie_word_embeddings = 256, 64, False
    return tiny.make_checkpoint(tmp_path_factory.mktemp("llama256") / "src", "llama",
                                dtype=torch.float32, tokenizer_dir=tokenizer_dir, config=config)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, llama_256):
    """(gguf path, imported directory) of the mixed file; default type Q4_K."""
    root = tmp_path_factory.mktemp("mixed")
    path = tiny_gguf.write_llama_gguf(root / "model-Q4_K_M.gguf", llama_256,
                                      linear_types=MIXED_TYPES, default_type="Q4_K")
    summary = convert(path, root / "q", progress=False)
    assert summary.requantized == () and summary.quantized == 15
    return path, root / "q"


def test_mixed_file_is_copied_exactly_with_a_spec_per_tensor(mixed):
    path, directory = mixed
    manifest = read_manifest(directory)
    assert manifest.source["exact"] is True and manifest.source["requantized"] == []
    assert json.loads((directory / "offload_manifest.json").read_text())["format_version"] == 2
    specs = {name: manifest.spec_of(entry) for name, entry in manifest.tensors.items()
             if entry.quantized}
    assert {spec.scheme for spec in specs.values()} == {
        EXACT_TYPES[t].spec.scheme for t in set(MIXED_TYPES.values()) | {"Q4_K"}}
    assert manifest.spec == EXACT_TYPES["Q4_K"].spec  # the type holding most parameters
    assert specs["model.layers.1.mlp.down_proj.weight"] == EXACT_TYPES["Q5_1"].spec
    assert manifest.tensors["model.layers.0.mlp.gate_proj.weight"].quant is None
    # raw blocks are the file's bytes (down_proj is not permuted: compare directly)
    from safetensors.torch import load_file

    stored = {}
    for shard in directory.glob("*.safetensors"):
        stored.update(load_file(shard))
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.ffn_down.weight")
    assert torch.equal(stored["model.layers.0.mlp.down_proj.weight.qweight"],
                       torch.from_numpy(np.array(tensor.data)))


def test_mixed_file_runs_as_transformers_reads_it(mixed):
    from transformers import AutoModelForCausalLM

    path, directory = mixed
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype=torch.float32).eval()
    tiny.assert_engine_matches(directory, reference, gpu_budget="4MiB")


def test_streaming_and_disk_tier_do_not_change_results(mixed):
    """Raw blocks streamed packed through the smallest cache, read from the shards every
    pass (disk tier), or held dequantized: the same logits as everything resident."""
    from offload_engine import load

    _, directory = mixed
    logits = []
    for settings in ({}, {"cache_format": "packed", "gpu_budget": "400KiB",
                          "host_budget": "320KiB"},
                     {"cache_format": "dequantized", "gpu_budget": "2MiB"}):
        with load(directory, progress=False, **settings) as engine, torch.no_grad():
            ids = engine.tokenizer(tiny.IMPORT_PROMPT, return_tensors="pt")["input_ids"]
            logits.append(engine.model(ids).logits)
            if "host_budget" in settings:
                assert len(engine.store.plan.on_disk) > 0
    assert all(torch.equal(logits[0], other) for other in logits[1:])


def test_eval_against_the_gguf_reference(mixed, capsys):
    from offload_engine.cli import main

    path, directory = mixed
    assert main(["eval", str(directory), "--reference", str(path), "--tokens", "64",
                 "--greedy-tokens", "4", "--json", "--no-progress", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    print(f"mixed K-quant import vs its GGUF: mean KL {report['mean_kl']:.3g}, "
          f"top-1 {report['top1_agreement']:.3f}")
    assert report["mean_kl"] < 1e-4 and report["top1_agreement"] == 1.0
    assert report["scheme"] == "gguf-q4_k"  # the type holding the most parameters
    assert main(["inspect", str(directory), "--no-progress"]) == 0
    assert "per-tensor schemes: gguf-q4_k g256" in capsys.readouterr().out


def test_planner_counts_each_tensor_as_stored(mixed):
    from offload_engine.planning.describe import describe_model
    from offload_engine.planning.planner import cache_entries

    _, directory = mixed
    manifest = read_manifest(directory)
    shape = describe_model(directory)
    planned = {name: copy for name, _, copy in cache_entries(shape, "packed", torch.bfloat16)}
    stored = {name[:-len(".weight")]: entry.nbytes for name, entry in manifest.tensors.items()
              if entry.quantized}
    assert planned == stored


def test_export_refuses_raw_blocks(mixed, tmp_path):
    from offload_engine.checkpoint.export import export_compressed_tensors

    _, directory = mixed
    with pytest.raises(ConversionError, match="holds GGUF Q6_K blocks.*no compressed-tensors"):
        export_compressed_tensors(directory, tmp_path / "ct", progress=False)
    assert not (tmp_path / "ct").exists()


def test_unsupported_types_refuse_before_work_or_are_listed(tmp_path, llama_256):
    # mostly IQ4_NL: refused, listing every type and its share
    iq = tiny_gguf.write_llama_gguf(tmp_path / "iq.gguf", llama_256, default_type="IQ4_NL",
                                    linear_types={"output.weight": "Q6_K"})
    with pytest.raises(SourceError, match=r"exact types hold 10.0% of their parameters.*types "
                                          r"IQ4_NL have no exact import.*IQ4_NL: 14 tensors, "
                                          r"90.0%.*Q6_K: 1 tensors, 10.0%.*--requantize"):
        convert(iq, tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()
    # an F16 output beside Q4_K linears: quantized here as int8 g32 fp16, and listed
    f16 = tiny_gguf.write_llama_gguf(tmp_path / "f16.gguf", llama_256, default_type="Q4_K",
                                     linear_types={"output.weight": "F16"})
    summary = convert(f16, tmp_path / "r", progress=False)
    assert summary.requantized == ("lm_head.weight",)
    manifest = read_manifest(tmp_path / "r")
    assert manifest.source["exact"] is False
    assert manifest.spec_of(manifest.tensors["lm_head.weight"]) == QuantSpec("int8", 32, "fp16")
