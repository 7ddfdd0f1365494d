"""Quality evaluation on tiny random models: exact self-agreement, damage detected, the CLI."""

import json
from types import SimpleNamespace

import pytest
import torch

from offload_engine.cli.main import main
from offload_engine.errors import ConfigError, SourceError
from offload_engine.quality.evaluate import (
    EvalSettings,
    batches_of,
    check_compatible,
    evaluate,
    load_reference,
    tokenize,
    windows_of,
)

REPORT_KEYS = {
    "model", "reference", "scheme", "group_size", "linear_bytes_per_param", "tokens",
    "predictions", "windows", "window", "perplexity", "reference_perplexity",
    "perplexity_increase", "mean_kl", "top1_agreement", "greedy_matching", "greedy_tokens",
    "device", "seconds",
}
SETTINGS = EvalSettings(tokens=160, window=64, greedy_tokens=24, prompt_tokens=16)


def _convert(tmp_path_factory, src, name, scheme, group_size):
    from offload_engine.checkpoint.convert import convert
    from offload_engine.quant.layout import QuantSpec

    dst = tmp_path_factory.mktemp(name) / "q"
    convert(src, dst, QuantSpec(scheme, group_size), progress=False)
    return dst


def _evaluate(model_dir, reference_dir, settings=SETTINGS):
    from offload_engine.decode.api import load

    with load(model_dir, device="cpu", progress=False) as engine:
        return evaluate(engine, load_reference(reference_dir), None, settings, progress=False)


@pytest.fixture(scope="module")
def qwen2_int8(tmp_path_factory, qwen2_src):
    return _convert(tmp_path_factory, qwen2_src, "qwen2int8", "int8", 64)


@pytest.fixture(scope="module")
def dequantized_reference(tmp_path_factory, qwen2_src, qwen2_int8):
    """The stock model with the engine's dequantized linear weights, as an HF directory."""
    from transformers import AutoModelForCausalLM

    from offload_engine.decode.api import load
    from offload_engine.quant.quantize import dequantize_weight

    model = AutoModelForCausalLM.from_pretrained(qwen2_src, dtype=torch.float32)
    modules = dict(model.named_modules())
    with load(qwen2_int8, device="cpu", progress=False) as engine, torch.no_grad():
        for name, weight in engine.store.items():
            modules[name].weight.copy_(dequantize_weight(weight))
    dst = tmp_path_factory.mktemp("dequantized") / "ref"
    model.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def healthy_int4(qwen2_q, qwen2_src):
    return _evaluate(qwen2_q, qwen2_src)


def test_engine_against_its_own_dequantized_weights_agrees_exactly(qwen2_int8,
                                                                  dequantized_reference):
    report = _evaluate(qwen2_int8, dequantized_reference)
    assert abs(report.mean_kl) < 1e-6
    assert report.top1_agreement == 1.0
    assert report.greedy_matching == report.greedy_tokens == SETTINGS.greedy_tokens
    assert report.perplexity == pytest.approx(report.reference_perplexity, rel=1e-5)
    assert report.tokens == SETTINGS.tokens
    assert report.windows == 3 and report.predictions == SETTINGS.tokens - 3


def test_int8_is_closer_to_the_source_than_int4(qwen2_int8, qwen2_src, healthy_int4):
    int8 = _evaluate(qwen2_int8, qwen2_src)
    assert 0 < int8.mean_kl < healthy_int4.mean_kl
    assert int8.top1_agreement >= healthy_int4.top1_agreement
    assert int8.linear_bytes_per_param > healthy_int4.linear_bytes_per_param


def test_damaged_quantization_is_detected(tmp_path_factory, qwen2_src, healthy_int4,
                                          monkeypatch):
    import offload_engine.checkpoint.convert as convert_module

    quantize = convert_module.quantize_weight

    def bad_scales(weight, spec, name="<tensor>"):
        # A scale bug: every other group's scale comes out 4x too large.
        quantized = quantize(weight, spec, name)
        quantized.scales[:, ::2] *= 4
        return quantized

    monkeypatch.setattr(convert_module, "quantize_weight", bad_scales)
    damaged_dir = _convert(tmp_path_factory, qwen2_src, "damaged", "int4", 64)
    damaged = _evaluate(damaged_dir, qwen2_src)
    assert damaged.mean_kl > 4 * healthy_int4.mean_kl
    assert damaged.top1_agreement < healthy_int4.top1_agreement
    assert damaged.perplexity_increase > healthy_int4.perplexity_increase


def test_windows_and_batches():
    ids = torch.arange(10).unsqueeze(0)
    assert [w.tolist() for w in windows_of(ids, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [w.numel() for w in windows_of(ids[:, :9], 4)] == [4, 4]  # a lone token dropped
    assert [w.numel() for w in windows_of(ids[:, :3], 4)] == [3]
    shapes = [b.shape for b in batches_of(windows_of(ids, 3), 2)]
    assert shapes == [(2, 3), (1, 3)]  # the trailing single token is dropped


def test_default_text_is_a_fixed_prefix(tokenizer_dir):
    from transformers import AutoTokenizer

    from offload_engine.quality.evaluate import default_text

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    short, long = tokenize(tokenizer, None, 50), tokenize(tokenizer, None, 400)
    assert long[0, :50].tolist() == short[0].tolist()
    full = tokenizer(default_text()[:20000], add_special_tokens=False)["input_ids"]
    assert long[0].tolist() == full[:400]


def test_text_too_short_and_vocab_mismatch_are_clear_errors(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    with pytest.raises(ConfigError, match="at least 2"):
        tokenize(tokenizer, "a", 100)
    engine = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(vocab_size=512)),
                             directory="quantized")
    reference = SimpleNamespace(config=SimpleNamespace(vocab_size=49152), reference_path="ref")
    with pytest.raises(ConfigError, match="49152 tokens but quantized has 512"):
        check_compatible(engine, reference)


def test_reference_errors_name_the_path(tmp_path, qwen2_q):
    with pytest.raises(SourceError, match="no such file"):
        load_reference(tmp_path / "missing")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(SourceError, match="must be a .gguf"):
        load_reference(tmp_path / "weights.bin")
    with pytest.raises(SourceError, match="not a model"):
        load_reference(tmp_path)
    with pytest.raises(SourceError, match="quantized directory"):
        load_reference(qwen2_q)


def test_cli_json_has_every_number(qwen2_q, qwen2_src, capsys):
    code = main(["eval", str(qwen2_q), "--reference", str(qwen2_src), "--tokens", "64",
                 "--greedy-tokens", "8", "--json", "--no-progress", "--device", "cpu"])
    assert code == 0
    captured = capsys.readouterr()
    assert "%|" not in captured.err  # --no-progress: no bar, transformers' loading bar included
    report = json.loads(captured.out)
    assert set(report) == REPORT_KEYS
    assert report["tokens"] == 64 and report["scheme"] == "int4" and report["group_size"] == 64
    assert 0 <= report["top1_agreement"] <= 1 and report["mean_kl"] >= 0


def test_cli_text_report(qwen2_q, qwen2_src, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    assert main(["eval", str(qwen2_q), "--reference", str(qwen2_src), "--text", str(text),
                 "--greedy-tokens", "4", "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for label in ("perplexity", "mean KL", "top-1 agreement", "greedy"):
        assert label in out


def test_cli_bad_reference_exits_2_with_one_line(qwen2_q, tmp_path, capsys):
    code = main(["eval", str(qwen2_q), "--reference", str(tmp_path / "nope"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope" in err and "--reference" in err
