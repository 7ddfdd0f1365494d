"""quantize --method: every method writes the same format, loads in the engine with the
logits of a transformers model holding its dequantized weights, and AWQ's folds are exact;
calibration memory stays bounded; bad calibration text is refused clearly."""

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from offload_engine import load
from offload_engine.checkpoint.calibrate import CalibrationSettings, calibrate
from offload_engine.checkpoint.calibration_data import (
    CalibrationData,
    default_calibration_text,
    pydoc_topics_text,
)
from offload_engine.checkpoint.convert import convert
from offload_engine.checkpoint.format import read_manifest, verify_directory
from offload_engine.checkpoint.methods import MethodSettings
from offload_engine.checkpoint.sources import open_source
from offload_engine.cli import main
from offload_engine.errors import ConfigError
from offload_engine.model import architecture
from offload_engine.quant.layout import QuantSpec
from offload_engine.quant.quantize import dequantize_weight
from offload_engine.runtime.store import read_dense_tensors
from tests import tiny

PROMPT_IDS = torch.tensor([[5, 77, 123, 9, 300, 41, 42, 250]])
SMALL_CALIBRATION = CalibrationSettings(CalibrationData(samples=4, seq_len=32))


def _method(name):
    return MethodSettings(name, calibration=SMALL_CALIBRATION)


def _model_from_directory(directory, engine):
    """A stock transformers model holding exactly what DIRECTORY stores, dequantized."""
    config = AutoConfig.from_pretrained(directory)
    model = AutoModelForCausalLM.from_config(config).float()
    state = {name: tensor.float() for name, tensor in read_dense_tensors(directory)}
    for name in engine.store:
        state[f"{name}.weight"] = dequantize_weight(engine.store[name], torch.float32)
    missing = set(model.state_dict()) - set(state)
    assert missing <= {"lm_head.weight"}  # only a tied output projection is not stored
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model.eval()


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("method", ["clip", "awq", "gptq", "awq-gptq"])
def test_method_round_trips_and_engine_matches_dequantized_model(request, tmp_path, arch,
                                                                   method):
    src = request.getfixturevalue(f"{arch}_src")
    _assert_method_round_trips(src, tmp_path / "q", method)


@pytest.mark.parametrize("any_src", ["smollm3", "ministral"], indirect=True)
def test_awq_on_the_llama_like_types_matches_the_dequantized_model(tmp_path, any_src):
    """SmolLM3 and Ministral fold as Llama does: awq converts and the engine equals the
    stock model holding what was written."""
    _, src = any_src
    _assert_method_round_trips(src, tmp_path / "q", "awq")


def _assert_method_round_trips(src, dst, method: str) -> None:
    """Convert SRC with METHOD; the engine equals the stock model holding what was written."""
    convert(src, dst, QuantSpec("int4-asym", 64), progress=False, method=_method(method))
    assert verify_directory(dst).source["quantization_method"]["name"] == method
    with load(dst, progress=False, dtype="float32") as engine:
        reference = _model_from_directory(dst, engine)
        with torch.no_grad():
            ours = engine.model(PROMPT_IDS).logits
            theirs = reference(PROMPT_IDS).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.fixture
def any_src(request, tmp_path_factory, tokenizer_dir):
    """The session's qwen2/llama checkpoints, or a tiny one of another foldable type."""
    arch = request.param
    if arch in ("qwen2", "llama"):
        return arch, request.getfixturevalue(f"{arch}_src")
    return arch, tiny.make_checkpoint(tmp_path_factory.mktemp(arch) / "src", arch,
                                      tokenizer_dir=tokenizer_dir)


@pytest.mark.parametrize("any_src", ["qwen2", "llama", "smollm3", "ministral"],
                         indirect=True)
def test_awq_folds_leave_the_float_model_unchanged(any_src):
    """Scaling columns by s and dividing the producer by s must not change any output."""
    arch, src = any_src
    source = open_source(src)
    skeleton = architecture.build_skeleton(source.config)
    plan = calibrate(source, skeleton, QuantSpec("int4-asym", 64), SMALL_CALIBRATION,
                     progress=False)
    assert plan.alphas and any(a > 0 for a in plan.alphas)
    # 4 query heads, 2 KV heads: v_proj cannot take o_proj's scales
    assert len(plan.skipped) == tiny.tiny_config(arch).num_hidden_layers
    assert all("o_proj" in reason for reason in plan.skipped)
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    folded = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    state = {name: plan.apply(name, tensor) for name, tensor in folded.state_dict().items()}
    assert sum(not torch.equal(state[n], t) for n, t in original.state_dict().items()) > 0
    folded.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(folded(PROMPT_IDS).logits, original(PROMPT_IDS).logits,
                                   rtol=1e-4, atol=1e-4)


PEAK_RSS_SCRIPT = """
import sys, threading, psutil
from offload_engine.checkpoint.calibrate import CalibrationSettings, calibrate
from offload_engine.checkpoint.calibration_data import CalibrationData
from offload_engine.checkpoint.sources import open_source
from offload_engine.model import architecture
from offload_engine.quant.layout import QuantSpec
source = open_source(sys.argv[1])
skeleton = architecture.build_skeleton(source.config)
skeleton.model.layers = skeleton.model.layers[: int(sys.argv[2])]
process, peak, done = psutil.Process(), [0], threading.Event()
def sample():
    while not done.wait(0.002):
        peak[0] = max(peak[0], process.memory_info().rss)
sampler = threading.Thread(target=sample)
sampler.start()
calibrate(source, skeleton, QuantSpec("int4-asym", 64),
          CalibrationSettings(CalibrationData(4, 32)), progress=False)
done.set()
sampler.join()
print(peak[0])
"""


def _peak_rss(src, layers) -> int:
    # A fixed mmap threshold: glibc otherwise raises it after each large free, so freed
    # layers stay in the heap and RSS climbs (measured: +53 MB for 6 more layers) though
    # nothing is held; with it, 2 and 8 layers peak within 0.2 MB of each other.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    result = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(src), str(layers)],
                            capture_output=True, text=True, timeout=600, check=True, env=env)
    return int(result.stdout.split()[-1])


def test_calibration_memory_is_bounded_by_one_layer(tmp_path, tokenizer_dir):
    """Peak RSS (psutil) of calibrating 8 layers is that of 2 layers: nothing accumulates.

    Each layer holds 16.8 MB of float32 weights; keeping them all would add 100 MB.
    """
    config = tiny.tiny_config("qwen2", hidden_size=512, intermediate_size=2048,
                              num_hidden_layers=8, num_key_value_heads=4)
    src = tiny.make_checkpoint(tmp_path / "src", "qwen2", tokenizer_dir=tokenizer_dir,
                               config=config, shards=1)
    layer_f32_bytes = (4 * 512 * 512 + 3 * 512 * 2048) * 4
    two, eight = _peak_rss(src, 2), _peak_rss(src, 8)
    assert eight - two < 1.5 * layer_f32_bytes, (two, eight, layer_f32_bytes)


def test_empty_or_short_calibration_file_is_refused(tmp_path, qwen2_src):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    short = tmp_path / "short.txt"
    short.write_text("just a few words of text")
    for path, message in ((empty, "is empty"), (short, "needs --calib-samples")):
        method = MethodSettings("awq", calibration=CalibrationSettings(
            CalibrationData(samples=4, seq_len=32, text_file=path)))
        with pytest.raises(ConfigError, match=message):
            convert(qwen2_src, tmp_path / "q", progress=False, method=method)
        assert not (tmp_path / "q").exists()
    with pytest.raises(ConfigError, match="--calib-file .*no such file"):
        convert(qwen2_src, tmp_path / "q", progress=False, method=MethodSettings(
            "awq", calibration=CalibrationSettings(CalibrationData(text_file=tmp_path / "x"))))
    with pytest.raises(ConfigError, match="--calib-samples"):
        CalibrationData(samples=0)


def test_calibration_text_is_disjoint_from_eval_text():
    full = pydoc_topics_text()
    calibration = default_calibration_text()
    assert full.endswith(calibration) and len(calibration) < len(full) * 0.51
    # eval's default (2048 tokens) reads at most 8 characters per token from the start
    assert 2048 * 8 < len(full) - len(calibration)


def test_cli_quantize_with_method_and_calibration_flags(tmp_path, llama_src, capsys):
    dst = tmp_path / "q"
    status = main(["quantize", str(llama_src), str(dst), "--method", "awq",
                        "--calib-samples", "2", "--calib-seq-len", "16", "--no-progress"])
    assert status == 0
    assert "method awq" in capsys.readouterr().out
    info = read_manifest(dst).source["quantization_method"]
    assert info["name"] == "awq" and info["calibration_samples"] == 2
    with pytest.raises(SystemExit):
        main(["quantize", str(llama_src), str(tmp_path / "r"), "--method", "bogus"])


def test_cli_default_is_auto_and_library_default_is_rtn():
    from offload_engine.checkpoint.methods import DEFAULT_METHOD
    from offload_engine.cli.main import build_parser

    assert DEFAULT_METHOD == "auto" and MethodSettings().name == "rtn"
    for command in (["quantize", "a", "b"], ["run", "a", "b"], ["serve", "a"]):
        assert build_parser().parse_args(command).method == "auto"
