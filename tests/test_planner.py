"""`offload-engine plan`, the planner and hardware profiles."""

import json
from dataclasses import asdict

import pytest

from offload_engine import load
from offload_engine.cli import main
from offload_engine.cli.plan_cmd import summarise_weights
from offload_engine.errors import ConfigError
from offload_engine.planning.planner import PlanRequest, describe_model, make_plan
from offload_engine.planning.profiles import available_profiles, load_profile
from offload_engine.quant.layout import QuantSpec

# Qwen2.5-32B / DeepSeek-R1-Distill-Qwen-32B, as published (no weights needed to plan).
QWEN25_32B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 5120,
    "intermediate_size": 27648, "num_hidden_layers": 64, "num_attention_heads": 40,
    "num_key_value_heads": 8, "vocab_size": 152064, "tie_word_embeddings": False,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
    "hidden_act": "silu", "torch_dtype": "bfloat16",
}
GB = 1e9


@pytest.fixture(scope="module")
def config_32b(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen25-32b") / "config.json"
    path.write_text(json.dumps(QWEN25_32B))
    return path


@pytest.fixture(scope="module")
def shape_32b(config_32b):
    # int4 symmetric g128: the scheme of the published figures (the default is int4-asym)
    return describe_model(config_32b, QuantSpec("int4", 128))  # 64-layer meta skeleton


def test_32b_sizes_match_the_published_arithmetic(shape_32b):
    plan = make_plan(shape_32b, PlanRequest(load_profile("rtx3090")))
    assert len(shape_32b.linears) == 64 * 7 + 1
    assert round(plan.weights["linear_layers"] / GB, 2) == 16.09
    assert round(plan.weights["lm_head"] / GB, 2) == 0.40
    assert plan.memory.kv_cache_per_token == 64 * 2 * 8 * 128 * 2 == 256 * 1024
    assert plan.memory.kv_cache == 4096 * 256 * 1024  # 1 GiB at the default --context
    assert round(plan.memory.embeddings / GB, 2) == 1.56
    # 24 GB holds every INT4 weight: decode is bound by the 936 GB/s memory (~57 tok/s ceiling).
    assert plan.fits and plan.cache.streamed_bytes == 0 and plan.prediction.hit_rate == 1.0
    bandwidth_only = 1 / (plan.prediction.step_s - plan.prediction.overhead_s)
    assert 45 < bandwidth_only < 57
    # ~3,565 eager ops at the profile's estimated ~8 us each: launches cost more than reads
    assert plan.prediction.overhead_s > plan.prediction.resident_read_s


def test_default_scheme_costs_its_zero_points(config_32b):
    """int4-asym g128 adds one uint8 zero point per 128 weights: 16.09 GB -> 16.33 GB."""
    plan = make_plan(describe_model(config_32b), PlanRequest(load_profile("rtx3090")))
    assert plan.model["spec"]["scheme"] == "int4-asym"
    assert round(plan.weights["linear_layers"] / GB, 2) == 16.33


def test_32b_on_small_cards_streams_and_amortises_over_the_batch(shape_32b):
    small = make_plan(shape_32b, PlanRequest(load_profile("rtx4060-8gb")))
    assert small.fits and small.cache.streamed_bytes > 10 * GB
    assert small.memory.total <= small.hardware["memory_bytes"]
    assert small.prediction.tokens_per_s < 2
    batch = make_plan(shape_32b, PlanRequest(load_profile("rtx4060-8gb"), context=1024,
                                             batch=4))
    assert batch.prediction.streamed_bytes_per_token == pytest.approx(
        batch.prediction.streamed_bytes_per_step / 4)
    assert batch.prediction.tokens_per_s > 3 * small.prediction.tokens_per_s


def test_plan_json_parses_and_matches(config_32b, capsys):
    assert main(["plan", str(config_32b), "--hw-profile", "rtx3060-12gb", "--json",
                 "--scheme", "int4", "--group-size", "128"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["memory"]["kv_cache_per_token"] == 262144
    assert round(data["weights"]["linear_layers"] / GB, 2) == 16.09
    assert data["settings"]["cache_format"] == "packed" and data["settings"]["dtype"] == "bfloat16"
    assert 0 < data["prediction"]["hit_rate"] < 1 and data["cache"]["slot_count"] == 3
    assert data["resident_summary"].startswith("layers 0-") and "lm_head" in \
        data["resident_summary"]
    assert data["memory"]["total"] <= data["hardware"]["memory_bytes"] and data["fits"]


def test_plan_text_is_labelled_a_prediction(config_32b, capsys):
    assert main(["plan", str(config_32b), "--hw-profile", "rtx4090", "--context", "8192",
                 "--scheme", "int4", "--group-size", "128"]) == 0
    out = capsys.readouterr().out
    assert "PREDICTION" in out and "tokens/s" in out
    assert "16.09 GB" in out and "256.0 KiB per token" in out
    assert "resident: layers 0-63: all linears; lm_head" in out


def test_too_small_a_card_says_it_cannot_fit(config_32b, tmp_path, capsys):
    card = tmp_path / "tiny-card.toml"
    card.write_text('name = "tiny"\ndevice = "cuda"\nmemory = "4GiB"\n'
                    'device_bandwidth_gb_s = 100\nh2d_bandwidth_gb_s = 8\nreserve = "1GiB"\n')
    assert main(["plan", str(config_32b), "--hw-profile", str(card), "--context", "8192"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "lower --context" in out


def test_bare_hf_directory_and_scheme(qwen2_src, capsys):
    assert main(["plan", str(qwen2_src), "--scheme", "int8", "--group-size", "64",
                 "--hw-profile", "cpu", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"]["spec"] == {"scheme": "int8", "group_size": 64}
    assert data["model"]["quantized"] is False


def test_quantized_directory_keeps_its_own_scheme(qwen2_q, capsys):
    assert main(["plan", str(qwen2_q), "--scheme", "int8"]) == 2
    assert "quantized as int4 g64" in capsys.readouterr().err
    assert main(["plan", str(qwen2_q), "--gpu-budget", "1kB"]) == 2
    assert "below the minimum" in capsys.readouterr().err


@pytest.mark.parametrize("policy,depth,cache_format", [
    ("static", 2, "dequantized"), ("static", 1, "packed"), ("lru", 2, "dequantized"),
])
def test_planner_agrees_with_the_runtime(qwen2_q, policy, depth, cache_format):
    shape = describe_model(qwen2_q)
    cpu = load_profile("cpu")
    floor = make_plan(shape, PlanRequest(cpu, gpu_budget="unbounded", policy=policy,
                                         prefetch_depth=depth, cache_format=cache_format))
    for budget in (floor.minimum_budget, (floor.minimum_budget + floor.cache.total_bytes) // 2,
                   None):
        request = PlanRequest(cpu, gpu_budget=budget if budget else "unbounded", policy=policy,
                              prefetch_depth=depth, cache_format=cache_format)
        planned = make_plan(shape, request).cache
        with load(qwen2_q, device="cpu", gpu_budget=budget, policy=policy, prefetch_depth=depth,
                  cache_format=cache_format, progress=False) as engine:
            assert asdict(planned) == asdict(engine.plan), budget
            assert planned.streamed_bytes == engine.stats["streamed_bytes"]


def test_every_preset_loads_and_bad_profiles_are_named(tmp_path):
    names = available_profiles()
    for name in ("rtx3090", "rtx4090", "rtx4060ti-16gb", "rtx3060-12gb", "rtx4060-8gb", "cpu"):
        assert name in names
        profile = load_profile(name)
        assert profile.reserve_bytes > 0 and profile.h2d_bandwidth < profile.device_bandwidth
    assert load_profile("rtx3090").device_bandwidth == 936e9
    assert load_profile("rtx4090").device_bandwidth == 1008e9
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\ndevice = "cuda"\nmemory = "8GiB"\nvram = 3\n')
    with pytest.raises(ConfigError, match="bad.toml.*missing keys.*unknown keys.*vram"):
        load_profile(bad)
    with pytest.raises(ConfigError, match="neither a preset"):
        load_profile("rtx9999")


def test_resident_summary_groups_layers():
    order = [f"model.layers.{i}.{kind}" for i in range(4)
             for kind in ("self_attn.q_proj", "mlp.up_proj")] + ["lm_head"]
    chosen = order[:5] + ["lm_head"]
    assert summarise_weights(chosen, order) == "layers 0-1: all linears; layer 2: q_proj; lm_head"
    assert summarise_weights([], order) == "none"


def test_run_with_hw_profile_uses_the_planned_budget(qwen2_q, tmp_path):
    """`--hw-profile` without a budget: the runtime builds exactly the arena `plan` derives."""
    def card(memory_bytes):
        path = tmp_path / f"card-{memory_bytes}.toml"
        path.write_text(f'name = "tiny-card"\ndevice = "cpu"\nmemory = "{memory_bytes}B"\n'
                        'device_bandwidth_gb_s = 10.0\nh2d_bandwidth_gb_s = 1.0\n'
                        'reserve = "0B"\n')
        return path

    big = make_plan(describe_model(qwen2_q), PlanRequest(load_profile(card(2**30)), context=256))
    room = big.memory.total - big.cache.arena_bytes  # everything but the weight arena
    middle = room + (big.minimum_budget + big.cache.total_bytes) // 2
    small_card = card(middle)
    planned = make_plan(describe_model(qwen2_q), PlanRequest(load_profile(small_card),
                                                              context=256))
    assert 0 < planned.cache.resident_bytes < planned.cache.total_bytes, "pick a card that streams"
    with load(qwen2_q, progress=False, device="cpu", hw_profile=str(small_card)) as engine:
        assert asdict(engine.plan) == asdict(planned.cache)


def test_embeddings_on_host_free_device_memory_for_weights(shape_32b):
    on_device = make_plan(shape_32b, PlanRequest(load_profile("rtx4060-8gb")))
    on_host = make_plan(shape_32b, PlanRequest(load_profile("rtx4060-8gb"), embeddings="host"))
    assert on_host.memory.embeddings == 0 and round(on_device.memory.embeddings / GB, 2) == 1.56
    assert on_host.cache.resident_bytes > on_device.cache.resident_bytes + GB
    assert on_host.prediction.tokens_per_s > on_device.prediction.tokens_per_s


def test_embeddings_on_host_need_untied_embeddings(llama_q):
    with pytest.raises(ConfigError, match="untied"):
        make_plan(describe_model(llama_q), PlanRequest(load_profile("rtx3090"),
                                                       embeddings="host"))
