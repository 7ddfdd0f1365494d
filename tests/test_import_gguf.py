"""Exact GGUF import: blocks against gguf-py's own dequantizer, whole files against
transformers' GGUF loader, errors before work, and bounded peak memory."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from offload_engine.checkpoint.convert import convert
from offload_engine.checkpoint.format import read_manifest
from offload_engine.errors import SourceError
from offload_engine.quant.gguf_blocks import EXACT_TYPES, import_rows
from offload_engine.quant.layout import QuantSpec
from offload_engine.quant.quantize import dequantize_weight
from tests import tiny, tiny_gguf

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize, quantize  # noqa: E402


def assert_bit_exact(type_name, raw, in_features):
    """Our import, dequantized by our reference, equals gguf-py's dequantize bit for bit."""
    qtype = gguf.GGMLQuantizationType[type_name]
    ours = dequantize_weight(import_rows(type_name, raw, in_features)).numpy()
    theirs = dequantize(raw, qtype)
    assert ours.shape == theirs.shape
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)), type_name


# The types unpacked into our layout; the raw-block ones: tests/test_kquants.py.
LAYOUT_TYPES = ("Q4_0", "Q4_1", "Q8_0")


@pytest.mark.parametrize("type_name", LAYOUT_TYPES)
def test_random_blocks_are_bit_exact(type_name):
    rng = np.random.default_rng(0)
    block_bytes = EXACT_TYPES[type_name].block_bytes
    rows, blocks = 37, 6
    # Any bytes are a valid block once the fp16 fields are finite: codes cover every value.
    raw = rng.integers(0, 256, size=(rows, blocks, block_bytes), dtype=np.uint8)
    fp16_fields = 2 if type_name == "Q4_1" else 1
    raw[..., : 2 * fp16_fields] = (rng.standard_normal((rows, blocks, fp16_fields)) * 0.05
                                   ).astype(np.float16).view(np.uint8)
    assert_bit_exact(type_name, raw.reshape(rows, -1), blocks * 32)
    # and blocks as gguf-py's quantizer writes them from float weights
    dense = rng.standard_normal((rows, blocks * 32)).astype(np.float32)
    assert_bit_exact(type_name, quantize(dense, gguf.GGMLQuantizationType[type_name]),
                     blocks * 32)


def test_q6_k_writer_is_read_back_by_gguf_py():
    """tests/tiny_gguf.py writes Q6_K itself (gguf-py cannot): gguf-py reads its blocks
    back within about half a step (the int8 sub-block scales round), and its own output
    is a fixed point."""
    rng = np.random.default_rng(7)
    values = (rng.standard_normal((6, 512)) * 0.1).astype(np.float32)
    values[0, :16] = 0  # an all-zero sub-block
    raw = tiny_gguf.quantize_q6_k(values)
    assert raw.shape == (6, 2 * 210) and raw.dtype == np.uint8
    read = dequantize(raw, gguf.GGMLQuantizationType.Q6_K)
    half_step = np.abs(values).reshape(6, -1, 16).max(-1, keepdims=True) / 31 / 2
    assert (np.abs(read - values).reshape(6, -1, 16) <= half_step * 1.02).all()
    assert np.array_equal(tiny_gguf.quantize_q6_k(read), raw)


def test_import_spec_per_type():
    assert EXACT_TYPES["Q4_0"].spec == QuantSpec("int4", 32, "fp16")
    assert EXACT_TYPES["Q4_1"].spec == QuantSpec("int4-min", 32, "fp16")
    assert EXACT_TYPES["Q8_0"].spec == QuantSpec("int8", 32, "fp16")


@pytest.mark.slow
def test_demo_model_tensors_are_bit_exact():
    from offload_engine.checkpoint.embedded import embedded_gguf

    try:
        path = embedded_gguf()
    except SourceError as exc:
        pytest.skip(str(exc))
    reader = gguf.GGUFReader(path)
    checked = set()
    for tensor in reader.tensors:  # the first and last layer, and the Q8_0 embedding
        if tensor.name.startswith(("blk.0.", "blk.29.", "token_embd")) and (
                tensor.tensor_type.name in EXACT_TYPES):
            assert_bit_exact(tensor.tensor_type.name, tensor.data, int(tensor.shape[0]))
            checked.add(tensor.tensor_type.name)
    assert checked == {"Q4_1", "Q8_0"}


@pytest.fixture(scope="module")
def llama_f32(tmp_path_factory, tokenizer_dir):
    """A tiny random Llama in fp32 (hidden 96, 4 heads, 2 KV heads: q/k permuted in GGUF)."""
    return tiny.make_checkpoint(tmp_path_factory.mktemp("llama32") / "src", "llama",
                                dtype=torch.float32, tokenizer_dir=tokenizer_dir)


def _gguf_file(tmp_path, llama_f32, **kwargs):
    return tiny_gguf.write_llama_gguf(tmp_path / "tiny.gguf", llama_f32, **kwargs)


@pytest.fixture(scope="module")
def llama_untied(tmp_path_factory, tokenizer_dir):
    """A tiny random Llama with its own lm_head, hidden 256: in a Q4_0/Q4_1 file llama.cpp
    gives the output matrix Q6_K, whose 256-element blocks need K % 256 == 0."""
    config = tiny.tiny_config("llama", intermediate_size=512)
    config.hidden_size, config.head_dim, config.tie_word_embeddings = 256, 64, False
    return tiny.make_checkpoint(tmp_path_factory.mktemp("untied") / "src", "llama",
                                dtype=torch.float32, tokenizer_dir=tokenizer_dir, config=config)


@pytest.fixture(scope="module")
def untied_q4_0(tmp_path_factory, llama_untied):
    """The untied Llama with every linear in Q4_0, imported: what exact codes look like."""
    root = tmp_path_factory.mktemp("untied_q4_0")
    path = tiny_gguf.write_llama_gguf(root / "all.gguf", llama_untied, linear_types={},
                                      default_type="Q4_0")
    convert(path, root / "q", progress=False)
    return root / "q"


def _stored(directory) -> dict:
    """Every tensor of a quantized directory's shards, by key."""
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def _half_step_bound(hidden: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """Largest logit change a re-rounded lm_head can cause: each weight moves at most half a
    step, so |logit_v - logit'_v| <= sum over groups g of scale[v, g] / 2 * sum |h_k|, k in g.

    hidden (B, T, K) is the lm_head's input, scales (V, K / group): returns (B, T, V)."""
    hidden_per_group = hidden.abs().reshape(*hidden.shape[:2], -1, group).sum(-1)  # (B, T, G)
    return hidden_per_group @ (scales.to(torch.float32) / 2).T


@pytest.mark.parametrize("output_type", ["Q8_0", "Q6_K"])
def test_other_exact_output_type_is_copied_with_its_own_spec(tmp_path, llama_untied,
                                                             untied_q4_0, output_type):
    """llama.cpp's Q4_0 file has a Q6_K output.weight (Q8_0 is other users' files): it is
    copied exactly with its own spec, and every Q4_0 linear as an all-Q4_0 import holds it."""
    path = tiny_gguf.write_llama_gguf(tmp_path / "mixed.gguf", llama_untied,
                                      linear_types={"output.weight": output_type},
                                      default_type="Q4_0")
    summary = convert(path, tmp_path / "q", progress=False)
    assert summary.requantized == () and summary.quantized == 15
    manifest = read_manifest(tmp_path / "q")
    assert manifest.spec == EXACT_TYPES["Q4_0"].spec and manifest.source["exact"] is True
    assert manifest.spec_of(manifest.tensors["lm_head.weight"]) == EXACT_TYPES[output_type].spec
    ours, exact = _stored(tmp_path / "q"), _stored(untied_q4_0)
    for key in exact:
        if not key.startswith("lm_head."):
            assert torch.equal(ours[key], exact[key]), key


def test_float_output_is_requantized_and_the_rest_copied(tmp_path, llama_untied, untied_q4_0):
    """An F16 output.weight beside Q4_0 linears (other users' files): every Q4_0 linear is
    copied bit for bit, lm_head is quantized here with int4 g32 fp16."""
    from transformers import AutoModelForCausalLM

    from offload_engine import load
    from offload_engine.checkpoint.sources.gguf import GGUFSource
    from offload_engine.quant.quantize import quantize_weight

    output_type = "F16"

    path = tiny_gguf.write_llama_gguf(tmp_path / "mixed.gguf", llama_untied,
                                      linear_types={"output.weight": output_type},
                                      default_type="Q4_0")
    summary = convert(path, tmp_path / "q", progress=False)
    assert summary.requantized == ("lm_head.weight",) and summary.quantized == 15
    manifest = read_manifest(tmp_path / "q")
    assert manifest.spec == EXACT_TYPES["Q4_0"].spec and manifest.source["exact"] is False
    assert manifest.source["requantized"] == ["lm_head.weight"]
    ours, exact = _stored(tmp_path / "q"), _stored(untied_q4_0)
    assert ours.keys() == exact.keys()
    for key in ours:  # linears, norms and embedding: what the all-Q4_0 import holds
        if not key.startswith("lm_head."):
            assert torch.equal(ours[key], exact[key]), key
    # lm_head went through convert's one quantizer, from the file's own dequantized values
    dense_head = GGUFSource(path).read_tensor("lm_head.weight")
    expected = quantize_weight(dense_head, manifest.spec, name="lm_head.weight")
    for part, value in expected.components().items():
        assert torch.equal(ours[f"lm_head.weight.{part}"], value), part

    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                     dtype=torch.float32).eval()
    with load(tmp_path / "q", progress=False, dtype="float32") as engine, torch.no_grad():
        ids = engine.tokenizer("The class statement defines", return_tensors="pt")["input_ids"]
        logits = engine.model(ids).logits
        output = reference(ids, output_hidden_states=True)
        theirs, hidden = output.logits, output.hidden_states[-1]
        # everything but lm_head is exact: with our lm_head, transformers computes ours
        requantized_head = dequantize_weight(expected)
        torch.testing.assert_close(logits, hidden @ requantized_head.T, rtol=0, atol=1e-5)
    torch.testing.assert_close(hidden @ dense_head.T, theirs, rtol=0, atol=1e-5)
    bound = _half_step_bound(hidden, expected.scales, manifest.group_size)
    difference = (logits - theirs).abs()
    assert bool((difference <= bound + 1e-5).all())
    print(f"{output_type} output: max |logit difference| {difference.max():.4f}, "
          f"largest half-step bound {bound.max():.4f}, "
          f"top-1 agreement {(logits.argmax(-1) == theirs.argmax(-1)).float().mean():.3f}")


@pytest.mark.parametrize("type_name", LAYOUT_TYPES + ("Q5_0", "Q5_1"))
def test_engine_logits_equal_transformers_on_the_gguf(tmp_path, llama_f32, type_name):
    from transformers import AutoModelForCausalLM


    path = _gguf_file(tmp_path, llama_f32, linear_types={}, default_type=type_name)
    summary = convert(path, tmp_path / "q", progress=False)
    # the tied Q8_0 embedding is also copied, exactly, as the untied output projection
    imported = "gguf " + "/".join(sorted({type_name, "Q8_0"}))
    assert summary.imported == imported and summary.quantized == 15
    manifest = read_manifest(tmp_path / "q")
    assert manifest.spec == EXACT_TYPES[type_name].spec
    assert manifest.source["exact"] is True and manifest.source["format"] == imported
    assert manifest.spec_of(manifest.tensors["lm_head.weight"]) == EXACT_TYPES["Q8_0"].spec
    assert json.loads((tmp_path / "q" / "config.json").read_text())["tie_word_embeddings"] \
        is False
    assert json.loads((tmp_path / "q" / "offload_manifest.json").read_text())["scale_dtype"] \
        == "fp16"
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                     dtype=torch.float32).eval()
    # the minimum budget plus a little: the int8 output matrix is kept resident, the rest streams
    tiny.assert_engine_matches(tmp_path / "q", reference, gpu_budget=tiny.GGUF_STREAMING_BUDGET)


def test_mixed_types_are_copied_each_and_refused_when_mostly_inexact(tmp_path, llama_f32):
    # One Q8_0 ffn_down among Q4_1 linears (what llama.cpp's quantizer does to a few
    # tensors): every linear is copied, the Q8_0 one with its own spec.
    path = _gguf_file(tmp_path, llama_f32, linear_types={"blk.1.ffn_down.weight": "Q8_0"})
    summary = convert(path, tmp_path / "q", progress=False)
    assert summary.requantized == ()
    manifest = read_manifest(tmp_path / "q")
    assert manifest.spec == EXACT_TYPES["Q4_1"].spec and manifest.source["exact"] is True
    down = manifest.tensors["model.layers.1.mlp.down_proj.weight"]
    assert manifest.spec_of(down) == EXACT_TYPES["Q8_0"].spec
    # Exact types hold no more than half of the parameters (attention 37.5% Q4_1, the MLPs
    # F32): refused before any work, unless everything is re-quantized.
    split = {f"blk.{layer}.ffn_{name}.weight": "F32" for layer in (0, 1)
             for name in ("gate", "up", "down")}
    path = _gguf_file(tmp_path, llama_f32, linear_types=split)
    with pytest.raises(SourceError, match=r"cannot be imported exactly \(exact types hold "
                                          r"37.5% .*F32: 6 tensors, 62.5%.*Q4_1: 8 "
                                          r"tensors, 37.5%.*--requantize"):
        convert(path, tmp_path / "q2", progress=False)
    assert not (tmp_path / "q2").exists()
    summary = convert(path, tmp_path / "q2", QuantSpec("int4-asym", 32), progress=False,
                      requantize=True)
    assert summary.imported == "" and summary.scheme == "int4-asym"
    manifest = read_manifest(tmp_path / "q2")
    assert manifest.source["exact"] is False and manifest.scale_dtype == "bf16"
    assert manifest.source["requantized"] == []


def test_main_type_is_counted_in_parameters_not_tensors(tmp_path, llama_f32):
    """8 attention tensors in Q4_1 hold 37.5% of the parameters, 6 MLP tensors in Q8_0 the
    rest: the directory's spec is int8, the attention tensors name their own (int4-min),
    and the MLP codes are those of an all-Q8_0 file."""
    attention = {f"blk.{layer}.attn_{name}.weight": "Q4_1" for layer in range(2)
                 for name in ("q", "k", "v", "output")}
    path = _gguf_file(tmp_path, llama_f32, linear_types=attention, default_type="Q8_0")
    convert(path, tmp_path / "q", progress=False)
    manifest = read_manifest(tmp_path / "q")
    assert manifest.spec == EXACT_TYPES["Q8_0"].spec and manifest.source["exact"] is True
    assert manifest.source["requantized"] == []
    assert {manifest.spec_of(manifest.tensors[f"model.layers.{layer}.self_attn.{name}_proj."
                                              "weight"])
            for layer in range(2) for name in "qkvo"} == {EXACT_TYPES["Q4_1"].spec}
    all_q8 = tiny_gguf.write_llama_gguf(tmp_path / "all.gguf", llama_f32, linear_types={},
                                        default_type="Q8_0")
    convert(all_q8, tmp_path / "all", progress=False)
    ours, reference = _stored(tmp_path / "q"), _stored(tmp_path / "all")
    mlp = [key for key in reference if ".mlp." in key]
    assert len(mlp) == 12  # qweight and scales of 6 linears
    assert all(torch.equal(ours[key], reference[key]) for key in mlp)


@pytest.mark.parametrize("case", ["IQ4_NL", "F32"])
def test_inexact_linears_say_what_to_do(tmp_path, llama_f32, llama_untied, case):
    if case == "F32":  # nothing exact at all
        path = _gguf_file(tmp_path, llama_f32, linear_types={}, default_type="F32")
        expected = r"types F32 have no exact import.*--requantize"
    else:  # mostly IQ4_NL: a few exact linears do not make an import
        path = tiny_gguf.write_llama_gguf(
            tmp_path / "k.gguf", llama_untied, default_type="IQ4_NL",
            linear_types={"blk.0.attn_q.weight": "Q4_0", "blk.1.attn_q.weight": "Q4_0"})
        expected = (r"exact types hold 10.0% of their parameters, not more than half; types "
                    r"IQ4_NL have no exact import; linears by type: IQ4_NL: 13 tensors, 90.0% "
                    r"of the parameters .*Q4_0: 2 tensors, 10.0%.*--requantize")
    with pytest.raises(SourceError, match=expected):
        convert(path, tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()


def test_peak_memory_stays_bounded(tmp_path):
    """GGUF sources are read tensor by tensor from a memory map: peak RSS stays about twice
    the largest tensor in float32 plus the shard buffer, not the whole model."""
    pytest.importorskip("psutil")
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the RSS high-water mark")
    largest, total = _write_big_gguf(tmp_path / "big.gguf")
    script = tmp_path / "measure.py"
    script.write_text(MEASURE_SCRIPT)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}  # see test_convert.py
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    growth = int(result.stdout.split()[-1])
    assert total >= 24 * largest  # holding the model as float32 would blow past the bound
    # two float32 copies of the largest tensor + the 16 MiB shard buffer + 96 MiB slack
    assert growth <= 2 * largest + (16 + 96) * 2**20, (growth, largest, total)
    print(f"GGUF import peak RSS growth {growth / 2**20:.0f} MiB, largest tensor "
          f"{largest / 2**20:.0f} MiB, model {total / 2**20:.0f} MiB in float32")


def _write_big_gguf(path, hidden=1024, inter=4096, layers=12, vocab=1024):
    """A Q4_1 Llama GGUF of 12 layers; (largest tensor, whole model) in float32 bytes."""
    names = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    shapes = [(hidden, hidden)] * 4 + [(inter, hidden)] * 2 + [(hidden, inter)]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(8)
    writer.add_head_count_kv(8)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_rope_dimension_count(hidden // 8)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(["a", "b", "ab"] + [f"t{i}" for i in range(vocab - 3)])
    writer.add_token_types([1] * vocab)
    writer.add_token_merges(["a b"])
    rng = np.random.default_rng(0)
    q41 = gguf.GGMLQuantizationType.Q4_1
    raw = {shape: quantize(rng.standard_normal(shape).astype(np.float32), q41)
           for shape in set(shapes)}
    for layer in range(layers):
        for name, shape in zip(names, shapes, strict=True):
            writer.add_tensor(f"blk.{layer}.{name}.weight", raw[shape], raw_dtype=q41)
        writer.add_tensor(f"blk.{layer}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{layer}.ffn_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("token_embd.weight",
                      rng.standard_normal((vocab, hidden)).astype(np.float32))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    total = layers * sum(n * k for n, k in shapes) * 4 + vocab * hidden * 4
    return inter * hidden * 4, total


# The kernel's own high-water mark of this process's RSS (VmHWM), reset at the baseline by
# writing 5 to /proc/self/clear_refs: no sampling thread (on a loaded machine it fought
# the converter for the GIL and slowed it twentyfold), and unlike ru_maxrss it does not
# carry over the parent's RSS from before exec.
MEASURE_SCRIPT = r'''
import sys
from pathlib import Path
import psutil
import gguf, transformers.modeling_gguf_pytorch_utils  # imported before the baseline
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
from offload_engine.checkpoint.convert import convert

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise SystemExit(f"no {key} in /proc/self/status")

root = Path(sys.argv[1])
Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
baseline = psutil.Process().memory_info().rss
convert(root / "big.gguf", root / "dst", shard_bytes=16 * 2**20, progress=False)
print(status("VmHWM") - baseline)
'''


def test_prequantized_safetensors_are_refused_before_work(tmp_path, llama_f32):
    src = tmp_path / "awq"
    src.mkdir()
    for path in llama_f32.iterdir():
        (src / path.name).write_bytes(path.read_bytes())
    config = json.loads((src / "config.json").read_text())
    # awq and gptq are imported now (tests/test_import_awq_gptq.py); a method without an
    # importer is refused by name
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match="quant_method 'bitsandbytes'.*not supported"):
        convert(src, tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()


def test_cli_names_requantized_linears_and_requantize_flag(tmp_path, llama_f32, capsys):
    from offload_engine.cli import main

    path = _gguf_file(tmp_path, llama_f32, linear_types={"blk.0.attn_v.weight": "F32"})
    v_proj = "model.layers.0.self_attn.v_proj.weight"
    assert main(["quantize", str(path), str(tmp_path / "q"), "--no-progress"]) == 0
    assert f"imported exactly from gguf F32/Q4_1/Q8_0, except 1 linear(s) quantized here: " \
        f"{v_proj}" \
        in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "q"), "--no-progress"]) == 0
    assert f"quantized here, from float: {v_proj}" in capsys.readouterr().out
    assert main(["quantize", str(path), str(tmp_path / "r"), "--requantize", "--scheme",
                 "int4", "--group-size", "32", "--no-progress"]) == 0
    manifest = read_manifest(tmp_path / "r")
    assert manifest.spec == QuantSpec("int4", 32) and manifest.source["exact"] is False
    assert manifest.source["format"] == "gguf F32/Q4_1" and manifest.source["requantized"] == []
    nothing_exact = _gguf_file(tmp_path, llama_f32, linear_types={}, default_type="F32")
    assert main(["quantize", str(nothing_exact), str(tmp_path / "s"), "--no-progress"]) == 2
    assert "--requantize" in capsys.readouterr().err
