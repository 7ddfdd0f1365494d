"""--placement experts-cpu: the experts the device's expert slots do not hold are computed
on the CPU from host RAM (llama.cpp's --n-cpu-moe), and `plan` predicts it beside streaming.

On this CPU-only machine both sides are the CPU: nothing moves, but the placement, the
boundary crossings and the byte accounting run as they would beside a GPU.
"""

import pytest
import torch

from offload_engine import load
from offload_engine.checkpoint.convert import convert
from offload_engine.cli.main import main
from offload_engine.errors import ConfigError
from offload_engine.planning.placement import CROSSINGS_PER_CPU_PART
from offload_engine.planning.planner import PlanRequest, describe_model, make_plan
from offload_engine.planning.profiles import load_profile
from offload_engine.quant.layout import QuantSpec
from tests import tiny

_BUILT = {}
IDS = torch.tensor([[5, 77, 123, 9, 300, 41, 42, 250, 17, 99, 3, 64]])


def _build(arch, tmp_path_factory, tokenizer_dir):
    if arch not in _BUILT:
        root = tmp_path_factory.mktemp(f"cpu-{arch}")
        src = tiny.make_checkpoint(root / "src", config=tiny.tiny_moe_config(arch),
                                   tokenizer_dir=tokenizer_dir, shards=1)
        convert(src, root / "q", QuantSpec("int4", 32), progress=False)
        _BUILT[arch] = root / "q"
    return _BUILT[arch]


@pytest.fixture(params=("qwen3_moe", "mixtral"))
def moe(request, tmp_path_factory, tokenizer_dir):
    return _build(request.param, tmp_path_factory, tokenizer_dir)


@pytest.fixture
def qwen3_moe(tmp_path_factory, tokenizer_dir):
    return _build("qwen3_moe", tmp_path_factory, tokenizer_dir)


def _minimum_budget(directory, dtype) -> int:
    with load(directory, progress=False, dtype=dtype) as engine:
        return engine.plan.minimum_budget + engine.stats["expert_minimum_bytes"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # reference, CPU int4 kernel
def test_greedy_tokens_equal_streaming_at_minimum_and_unbounded_budgets(moe, dtype):
    tokens = {}
    for budget in (_minimum_budget(moe, dtype), "unbounded"):
        for placement in ("stream", "experts-cpu"):
            with load(moe, progress=False, dtype=dtype, gpu_budget=budget,
                      placement=placement) as engine:
                result = engine.generate(tiny.IMPORT_PROMPT, greedy=True, max_new_tokens=6)
                tokens[(budget, placement)] = result.token_ids
                if placement == "experts-cpu" and budget != "unbounded":
                    assert result.stats.experts_cpu_per_token > 0
                    assert result.stats.expert_bytes_per_token == 0  # nothing copied
                    assert "on the CPU/token" in result.stats.line()
    first = next(iter(tokens.values()))
    assert len(set(first)) > 1 and all(found == first for found in tokens.values()), tokens


def test_cpu_bytes_and_crossings_per_decode_step_equal_the_plan(qwen3_moe):
    """At the hit rate a decode run measures, the cold expert bytes the CPU read per step
    equal `plan`'s prediction for --placement experts-cpu; two crossings per experts layer."""
    budget = _minimum_budget(qwen3_moe, "bfloat16")
    with load(qwen3_moe, progress=False, dtype="bfloat16", gpu_budget=budget,
              placement="experts-cpu") as engine, torch.no_grad():
        assert engine.stats["placement_chosen"] == "experts-cpu"
        assert engine.stats["expert_slots_per_layer"] == 1
        copied = engine.cache.stats.expert_h2d_bytes  # the fixed set, loaded once
        cache = tiny_cache()
        engine.model(IDS[:, :4], cache=cache, use_cache=True)  # prefill
        engine.cache.reset_stats()
        before = engine.counters()
        for t in range(4, IDS.shape[1]):
            engine.model(IDS[:, t:t + 1], cache=cache, use_cache=True)
        after, stats = engine.counters(), engine.cache.stats
    steps = IDS.shape[1] - 4
    cpu_bytes = (after["boundary_cpu_bytes"] - before["boundary_cpu_bytes"]) / steps
    crossings = after["boundary_crossings"] - before["boundary_crossings"]
    assert stats.expert_cpu > 0 and stats.expert_misses == 0 and stats.expert_h2d_bytes == 0
    assert copied == 0 and stats.expert_hits + stats.expert_cpu == steps * 2 * 2
    # a step with no cold expert in a layer crosses nothing there
    assert 0 < crossings <= steps * 2 * CROSSINGS_PER_CPU_PART
    plan = make_plan(describe_model(qwen3_moe),
                     PlanRequest(load_profile("cpu"), gpu_budget=budget, dtype="bfloat16",
                                 placement="experts-cpu", expert_hit_rate=stats.expert_hit_rate))
    assert plan.placement["placement_chosen"] == "experts-cpu"
    assert plan.placement["expert_cpu_bytes_per_step"] == pytest.approx(cpu_bytes, abs=1)


def tiny_cache():
    from transformers import DynamicCache

    return DynamicCache()


def test_plan_and_run_refuse_the_same_placements(qwen3_moe, tmp_path, tokenizer_dir):
    shape = describe_model(qwen3_moe)
    for placement in ("cpu", "mlp-cpu"):
        with pytest.raises(ConfigError, match="mixture-of-experts"):
            make_plan(shape, PlanRequest(load_profile("rtx4060-8gb"), placement=placement))
        with pytest.raises(ConfigError, match="mixture-of-experts"):
            load(qwen3_moe, progress=False, placement=placement)
    dense = tiny.make_checkpoint(tmp_path / "src", tokenizer_dir=tokenizer_dir, shards=1)
    convert(dense, tmp_path / "q", QuantSpec("int4", 32), progress=False)
    with pytest.raises(ConfigError, match="no experts"):
        make_plan(describe_model(tmp_path / "q"),
                  PlanRequest(load_profile("rtx4060-8gb"), placement="experts-cpu"))
    with pytest.raises(ConfigError, match="no experts"):
        load(tmp_path / "q", progress=False, placement="experts-cpu")
    small_ram = dict(host_budget="20KiB", gpu_budget=_minimum_budget(qwen3_moe, "float32"),
                     dtype="float32")
    with pytest.raises(ConfigError, match="host-budget"):
        make_plan(shape, PlanRequest(load_profile("cpu"), placement="experts-cpu", **small_ram))
    with pytest.raises(ConfigError, match="host-budget"):
        load(qwen3_moe, progress=False, placement="experts-cpu", **small_ram)


@pytest.mark.parametrize("hit_rate, chosen", [(0.5, "experts-cpu"), (0.99, "stream")])
def test_auto_picks_the_faster_prediction_for_qwen3_30b(hit_rate, chosen):
    """rtx4060ti-16gb: 12 GB/s over the link, 30 GB/s for the CPU kernel (its ESTIMATE).
    Half the 384 experts per step cold: the CPU reads them faster than the link copies
    them; 1% cold: the 96 crossings cost more than the copies they save."""
    from pathlib import Path

    config = Path(__file__).parent / "fixtures" / "qwen3_30b_a3b_config.json"
    plan = make_plan(describe_model(config, QuantSpec("int4", 128)),
                     PlanRequest(load_profile("rtx4060ti-16gb"), expert_hit_rate=hit_rate))
    info = plan.placement
    assert info["placement_chosen"] == chosen
    stream, cpu = info["predicted_stream_step_s"], info["predicted_hybrid_step_s"]
    assert (cpu < stream) == (chosen == "experts-cpu")
    assert stream == plan.prediction.step_s
    on_disk = make_plan(describe_model(config, QuantSpec("int4", 128)),
                        PlanRequest(load_profile("rtx4060ti-16gb"), expert_hit_rate=hit_rate,
                                    host_budget="8GiB"))
    assert on_disk.placement["placement_chosen"] == "stream"  # cold experts must be in RAM


def test_plan_prints_both_predictions_for_a_moe_model(qwen3_moe, capsys):
    assert main(["plan", str(qwen3_moe), "--hw-profile", "rtx4060-8gb", "--gpu-budget",
                 "300KiB", "--placement", "experts-cpu"]) == 0
    out = capsys.readouterr().out
    assert "placement (--placement experts-cpu): experts-cpu" in out
    assert "cold experts:" in out and "read from host RAM" in out
    assert "cold experts on the CPU" in out and "stream" in out


def test_llama4_pre_routed_experts_run_on_the_cpu_too(tmp_path, tokenizer_dir):
    """Llama 4's experts get every token's rows pre-scaled (runtime/experts.py _pre_routed):
    the cold ones cross to the CPU in one transfer per layer as well."""
    src = tiny.make_checkpoint(tmp_path / "src", config=tiny.tiny_arch_config("llama4_text"),
                               tokenizer_dir=tokenizer_dir, shards=1)
    convert(src, tmp_path / "q", QuantSpec("int4", 32), progress=False)
    budget = _minimum_budget(tmp_path / "q", "float32")
    tokens = {}
    for placement in ("stream", "experts-cpu"):
        with load(tmp_path / "q", progress=False, gpu_budget=budget, dtype="float32",
                  placement=placement) as engine:
            result = engine.generate(tiny.IMPORT_PROMPT, greedy=True, max_new_tokens=6)
            tokens[placement] = result.token_ids
    assert result.stats.experts_cpu_per_token > 0
    assert tokens["stream"] == tokens["experts-cpu"] and len(set(tokens["stream"])) > 1
