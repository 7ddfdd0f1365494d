"""`offload-engine synth`: real shapes, random weights, a tokenizer; loads and runs."""

import json

import pytest
import torch

from offload_engine import load
from offload_engine.checkpoint.format import read_manifest
from offload_engine.checkpoint.synth import SynthRequest, is_synthetic, synthesize
from offload_engine.cli import main
from offload_engine.errors import ConfigError
from offload_engine.planning.planner import PlanRequest, describe_model, make_plan
from offload_engine.planning.profiles import load_profile
from offload_engine.quant.layout import QuantSpec
from tests.test_planner import QWEN25_32B
from tests.tiny import tiny_config

GB = 1e9


@pytest.fixture(scope="module")
def tiny_synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    config = root / "config.json"
    config.write_text(tiny_config("qwen2").to_json_string())
    dst = root / "model"
    assert main(["synth", str(config), str(dst), "--group-size", "64", "--no-progress",
                 "--shard-size", "64KiB"]) == 0
    return dst


def test_synthetic_model_is_marked_and_inspect_says_so(tiny_synth, capsys):
    manifest = read_manifest(tiny_synth)
    assert is_synthetic(manifest) and manifest.source["synthetic"] is True
    assert len(manifest.shards) > 1  # --shard-size bounds what is buffered in RAM
    assert main(["inspect", str(tiny_synth)]) == 0
    assert "SYNTHETIC model" in capsys.readouterr().out


def test_synthetic_model_runs_and_run_says_so(tiny_synth, capsys):
    assert main(["run", str(tiny_synth), "--prompt", "The cat", "--greedy",
                 "--max-new-tokens", "4", "--device", "cpu", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "SYNTHETIC model" in captured.err and "4 tokens" in captured.err
    with load(tiny_synth, device="cpu", progress=False) as engine:
        ids = engine.tokenizer("hello world", return_tensors="pt")["input_ids"]
        logits = engine.model(ids).logits
        assert torch.isfinite(logits).all()
        # rows past the tokenizer's 512 ids score near zero: the greedy token decodes
        assert int(logits[0, -1].argmax()) < len(engine.tokenizer)


def test_synthetic_plan_equals_measured_bytes_per_token(tiny_synth):
    shape = describe_model(tiny_synth)
    floor = make_plan(shape, PlanRequest(load_profile("cpu"), gpu_budget="unbounded"))
    budget = (floor.minimum_budget + floor.cache.total_bytes) // 2
    plan = make_plan(shape, PlanRequest(load_profile("cpu"), gpu_budget=budget, context=64))
    with load(tiny_synth, device="cpu", gpu_budget=budget, progress=False) as engine:
        stats = engine.generate("The cat", max_new_tokens=3, greedy=True).stats
    assert plan.prediction.streamed_bytes_per_step > 0
    assert stats.h2d_bytes_per_token == plan.prediction.streamed_bytes_per_step


def test_same_seed_same_bytes(tiny_synth, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(tiny_config("qwen2").to_json_string())
    again = synthesize(SynthRequest(str(config), QuantSpec("int4-asym", 64),
                                    shard_bytes=64 * 1024), tmp_path / "again", progress=False)
    for shard in read_manifest(tiny_synth).shards:
        assert (again.destination / shard).read_bytes() == (tiny_synth / shard).read_bytes()


@pytest.fixture(scope="module")
def config_32b(tmp_path_factory):
    path = tmp_path_factory.mktemp("q32") / "config.json"
    path.write_text(json.dumps(QWEN25_32B))
    return path


def test_synth_32b_reports_the_plans_full_size_without_writing_it(config_32b, tmp_path,
                                                                 capsys):
    plan = make_plan(describe_model(config_32b), PlanRequest(load_profile("rtx3090")))
    dry = synthesize(SynthRequest("qwen2.5-32b", layers=2), None)
    assert dry.layers_full == 64 and dry.layers_written == 2
    assert dry.full_bytes["linear_layers"] == plan.weights["linear_layers"]
    assert dry.full_bytes["lm_head"] == plan.weights["lm_head"]
    assert round(dry.full_bytes["linear_layers"] / GB, 2) == 16.33  # int4-asym g128
    assert main(["synth", "qwen2.5-32b", "--layers", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run" in out and "2 of 64 layers" in out and "16.33 GB" in out
    # One real layer at the real width (a small vocabulary keeps it to ~250 MB): its
    # manifest's per-layer bytes x 64 are the plan's 32B figure.
    written = synthesize(SynthRequest("qwen2.5-32b", layers=1, vocab_size=512),
                         tmp_path / "q32-1layer", progress=False)
    manifest = read_manifest(written.destination)
    assert manifest.source["full_layers"] == 64 and manifest.source["layers"] == 1
    assert manifest.bytes_by_role()["linear"] * 64 == plan.weights["linear_layers"]


def test_bad_requests_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="built-in"):
        synthesize(SynthRequest("no-such-model"), None)
    with pytest.raises(ConfigError, match="--layers"):
        SynthRequest("qwen2.5-7b", layers=0)
    assert main(["synth", "qwen2.5-7b"]) == 2  # neither DST nor --dry-run


MEASURE_SCRIPT = r'''
import sys, threading, time
from pathlib import Path
import psutil
from transformers import LlamaConfig
from offload_engine.checkpoint.synth import SynthRequest, synthesize
from offload_engine.quant.layout import QuantSpec

root = Path(sys.argv[1])
LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=48,
            num_attention_heads=8, num_key_value_heads=8, vocab_size=1024,
            tie_word_embeddings=True).save_pretrained(root)
process = psutil.Process()
import torch  # noqa: F401  (imported before the baseline, as synthesize needs it)
synthesize(SynthRequest(str(root / "config.json"), QuantSpec("int4-asym", 128), layers=1,
                        shard_bytes=16 << 20), root / "warm", progress=False)
baseline, peak, done = process.memory_info().rss, [0], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], process.memory_info().rss)
        time.sleep(0.005)

thread = threading.Thread(target=sample)
thread.start()
summary = synthesize(SynthRequest(str(root / "config.json"), QuantSpec("int4-asym", 128),
                                  shard_bytes=16 << 20), root / "out", progress=False)
done.set()
thread.join()
print(peak[0] - baseline, summary.written_bytes)
'''


def test_synth_peak_memory_stays_bounded(tmp_path):
    """Weights are generated tensor by tensor into 16 MiB shards: RAM does not grow with size."""
    import os
    import subprocess
    import sys

    script = tmp_path / "measure.py"
    script.write_text(MEASURE_SCRIPT)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}  # see test_convert.py
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    growth, written = map(int, result.stdout.split())
    assert written > 400 * 2**20  # holding the model would blow far past the bound
    # the 16 MiB shard buffer + a safetensors copy of it + 96 MiB of allocator slack
    assert growth <= (2 * 16 + 96) * 2**20, (growth, written)
