"""`plan --speculate-tokens K --acceptance A [--draft-model DIR]`: a labelled prediction."""

import json

import pytest

from offload_engine.cli import main
from offload_engine.planning.speculation import predict_speculation
from tests.test_planner import QWEN25_32B

# Qwen2.5-0.5B-Instruct as published, a draft for the 32B (same tokenizer, fewer padded rows).
QWEN25_05B = {**QWEN25_32B, "hidden_size": 896, "intermediate_size": 4864,
              "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
              "vocab_size": 151936, "tie_word_embeddings": True}
PLAN = ["--hw-profile", "rtx3060-12gb", "--scheme", "int4", "--group-size", "128", "--json"]


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("speculation-plan")
    for name, config in (("32b", QWEN25_32B), ("05b", QWEN25_05B)):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config))
    return root / "32b" / "config.json", root / "05b" / "config.json"


def _plan(capsys, *args):
    code = main(["plan", *args])
    return code, json.loads(capsys.readouterr().out)


def test_lookup_prediction_multiplies_tokens_per_pass(configs, capsys):
    target, _ = configs
    _, plain = _plan(capsys, str(target), *PLAN)
    _, spec = _plan(capsys, str(target), *PLAN, "--speculate-tokens", "4", "--acceptance", "0.5")
    assert plain["speculation"] is None
    step = spec["prediction"]["step_s"]
    assert step == plain["prediction"]["step_s"]  # no draft: the same target step
    assert spec["speculation"]["tokens_per_pass"] == 3.0
    assert spec["speculation"]["tokens_per_s"] == pytest.approx(3.0 / step)
    assert spec["speculation"]["streamed_bytes_per_token"] == pytest.approx(
        plain["prediction"]["streamed_bytes_per_token"] / 3)


def test_draft_memory_joins_the_plan_and_its_steps_the_time(configs, capsys):
    target, draft = configs
    _, plain = _plan(capsys, str(target), *PLAN)
    _, spec = _plan(capsys, str(target), *PLAN, "--speculate-tokens", "4", "--acceptance",
                    "0.5", "--draft-model", str(draft))
    draft_bytes = spec["memory"]["draft"]
    assert 0.3e9 < draft_bytes < 1.0e9  # 0.5B at int4-asym, its 136M-row embedding in bf16
    # the weight budget the card leaves shrinks by the draft's bytes
    assert spec["cache"]["resident_bytes"] < plain["cache"]["resident_bytes"]
    assert spec["speculation"]["draft_bytes"] == draft_bytes
    bandwidth = spec["hardware"]["device_bandwidth"]
    assert spec["speculation"]["pass_s"] == pytest.approx(
        spec["prediction"]["step_s"] + 4 * draft_bytes / bandwidth)


def test_text_output_says_prediction(configs, capsys):
    target, _ = configs
    code = main(["plan", str(target), "--hw-profile", "rtx3060-12gb", "--speculate-tokens", "4",
                 "--acceptance", "0.5"])
    out = capsys.readouterr().out
    assert code == 0 and "PREDICTION with speculation (K=4, acceptance 50%" in out


def test_acceptance_is_required_and_checked(configs, capsys):
    target, _ = configs
    assert main(["plan", str(target), "--speculate-tokens", "4"]) == 2
    assert "--acceptance" in capsys.readouterr().err
    assert main(["plan", str(target), "--speculate-tokens", "4", "--acceptance", "1.5"]) == 2
    assert "[0, 1]" in capsys.readouterr().err


def test_full_acceptance_gives_k_plus_one_tokens():
    pred = predict_speculation(0.1, 1e9, 4, 1.0, 1e12)
    assert pred.tokens_per_pass == 5 and pred.speedup == pytest.approx(5.0)
