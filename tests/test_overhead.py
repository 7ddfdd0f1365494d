"""The planner's per-token overhead term: ops counted on tiny models, cost from the profile."""

import json
from dataclasses import replace

import pytest

from offload_engine.cli import main
from offload_engine.model.op_count import count_step_ops, decode_ops, tiny_config
from offload_engine.planning.overhead import figure_sources
from offload_engine.planning.planner import PlanRequest, describe_model, make_plan
from offload_engine.planning.profiles import load_profile
from tests.test_planner import QWEN25_32B
from tests.tiny import tiny_config as tiny_test_config


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_op_count_is_linear_in_depth_and_counted_on_a_deep_model(arch):
    config = tiny_test_config(arch)
    ops = decode_ops(config)
    assert ops.per_layer > 10 and ops.base > 0
    # a direct count on a deeper tiny model equals the extrapolation from depths 1 and 2
    assert count_step_ops(tiny_config(config, 6)) == ops.at_depth(6)


def test_tiny_config_keeps_the_architecture_and_shrinks_the_width():
    from transformers import Qwen2Config

    big = Qwen2Config(**{k: v for k, v in QWEN25_32B.items() if k != "architectures"})
    tiny = tiny_config(big, 3)
    assert type(tiny) is Qwen2Config and tiny.num_hidden_layers == 3
    assert tiny.hidden_size == 64 and tiny.vocab_size == 128
    # 40 query heads over 8 KV heads: the grouping (5 per KV head) is kept where it fits
    assert tiny.num_attention_heads % tiny.num_key_value_heads == 0


@pytest.fixture(scope="module")
def config_32b(tmp_path_factory):
    path = tmp_path_factory.mktemp("q32") / "config.json"
    path.write_text(json.dumps(QWEN25_32B))
    return path


def test_prediction_adds_ops_times_per_op_cost(config_32b):
    shape = describe_model(config_32b)
    assert shape.decode_ops_per_step == decode_ops_for_32b()
    profile = load_profile("rtx3090")
    plan = make_plan(shape, PlanRequest(profile))
    pred = plan.prediction
    assert pred.ops_per_step == shape.decode_ops_per_step
    assert pred.overhead_s == pytest.approx(shape.decode_ops_per_step * profile.op_overhead_s)
    assert pred.step_s == pytest.approx(pred.resident_read_s + pred.dense_read_s + pred.stream_s
                                        + pred.kv_read_s + pred.overhead_s)
    free = make_plan(shape, PlanRequest(replace(profile, op_overhead_s=0.0))).prediction
    assert free.step_s == pytest.approx(pred.step_s - pred.overhead_s)
    assert pred.tokens_per_s < free.tokens_per_s


def decode_ops_for_32b() -> int:
    from transformers import Qwen2Config

    config = Qwen2Config(**{k: v for k, v in QWEN25_32B.items() if k != "architectures"})
    return decode_ops(config).at_depth(64)


def test_shipped_profiles_label_their_per_op_cost_as_an_estimate():
    for name in ("rtx3090", "rtx4060-8gb"):
        profile = load_profile(name)
        assert profile.op_overhead_s > 0 and "ESTIMATE" in profile.op_overhead_source
        figures = figure_sources(profile)
        assert figures["measured"] == []
        assert any("op_overhead_us" in item for item in figures["estimated"])


def test_plan_output_shows_the_overhead_and_what_is_measured(config_32b, capsys):
    assert main(["plan", str(config_32b), "--hw-profile", "rtx3090"]) == 0
    out = capsys.readouterr().out
    assert "op overhead" in out and "ops per step" in out
    assert "measured on the card: none" in out and "ESTIMATE" in out
    assert main(["plan", str(config_32b), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prediction"]["overhead_s"] > 0 and report["figures"]["estimated"]


def test_dispatched_ops_counts_ops_called_from_python_not_their_children():
    import torch

    from offload_engine.model.op_count import dispatched_ops

    linear = torch.nn.Linear(4, 4)
    assert dispatched_ops(lambda: (torch.ones(3) + 1).sum()) == 3  # ones, add, sum
    assert dispatched_ops(lambda: linear(torch.ones(2, 4))) == 2  # ones, linear (not addmm)
