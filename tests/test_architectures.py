"""Architectures that failed before issue 25, quantized from save_pretrained (hub layout)
and run against transformers holding the dequantized weights."""

import pytest
import torch

from offload_engine import load
from offload_engine.checkpoint.convert import convert
from offload_engine.cli.main import main
from offload_engine.quant.layout import QuantSpec
from tests import tiny

FAST = ["gpt_neox", "gemma2", "gpt_oss", "phimoe", "llama4_text"]
SLOW = ["deepseek_v3", "glm4_moe", "gemma4_text", "qwen3_next"]


def _quantized(tmp_path, tokenizer_dir, arch):
    src = tiny.make_checkpoint(tmp_path / "src", config=tiny.tiny_arch_config(arch),
                               tokenizer_dir=tokenizer_dir, shards=1)
    convert(src, tmp_path / "q", QuantSpec("int4", 32), progress=False)
    return src, tmp_path / "q"


@pytest.mark.parametrize("arch", FAST + [pytest.param(a, marks=pytest.mark.slow) for a in SLOW])
def test_quantize_and_run_match_transformers(tmp_path, tokenizer_dir, arch):
    src, directory = _quantized(tmp_path, tokenizer_dir, arch)
    reference = tiny.dequantized_reference(src, directory)
    tiny.assert_engine_matches(directory, reference, gpu_budget="unbounded", atol=1e-4,
                               greedy_tokens=4)


def test_llama4_fetches_only_the_picked_experts_and_matches_at_the_minimum(tmp_path,
                                                                         tokenizer_dir):
    src, directory = _quantized(tmp_path, tokenizer_dir, "llama4_text")
    with load(directory, progress=False, dtype="float32") as engine:
        minimum = engine.plan.minimum_budget + engine.stats["expert_minimum_bytes"]
    tiny.assert_engine_matches(directory, tiny.dequantized_reference(src, directory),
                               gpu_budget=minimum, atol=1e-4, greedy_tokens=4)
    with load(directory, progress=False, dtype="float32", gpu_budget=minimum) as engine:
        engine.generate(tiny.IMPORT_PROMPT, greedy=True, max_new_tokens=3)
        stats = engine.cache.stats
    # top-1 routing over 2 experts layers: at most 2 experts used per token
    assert 0 < stats.expert_hits + stats.expert_misses <= 2 * stats.expert_tokens


def test_gemma_host_embeddings_keep_the_embedding_scale(tmp_path, tokenizer_dir):
    _, directory = _quantized(tmp_path, tokenizer_dir, "gemma2")
    ids = torch.tensor([[5, 77, 123, 9]])
    with torch.no_grad():
        with load(directory, progress=False, dtype="float32") as engine:
            on_device = engine.model(ids).logits
        with load(directory, progress=False, dtype="float32", embeddings="host") as engine:
            on_host = engine.model(ids).logits
    torch.testing.assert_close(on_host, on_device, rtol=0, atol=1e-5)


def test_explicit_attention_the_model_refuses_is_one_line(tmp_path, tokenizer_dir):
    from offload_engine.errors import ConfigError

    _, directory = _quantized(tmp_path, tokenizer_dir, "gemma2")
    with pytest.raises(ConfigError, match="--attention sdpa is not supported.*gemma2"):
        load(directory, progress=False, dtype="float32", attention="sdpa")


def test_unsupported_model_types_get_one_line(tmp_path, capsys):
    from safetensors.torch import save_file
    from transformers import T5Config

    src = tmp_path / "t5"
    T5Config(d_model=64, num_layers=1, vocab_size=100).save_pretrained(src)
    save_file({"shared.weight": torch.zeros(100, 64)}, str(src / "model.safetensors"))
    assert main(["quantize", str(src), str(tmp_path / "q"), "--method", "rtn",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "'t5'" in err and len(err.strip().splitlines()) == 1
