"""`plan` on full-size mixture-of-experts configs (typed in from the published config.json
files, tests/fixtures/): sizes equal the hand arithmetic of docs/moe.md, and building the
skeleton of a 671B model never allocates its tensors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from offload_engine.cli.main import main

FIXTURES = Path(__file__).parent / "fixtures"
INT4_G128 = 0.5 + 16 / 128 / 8  # bytes per parameter: 4-bit codes + a bf16 scale per 128


def _plan(config: str, *flags: str) -> list:
    argv = ["plan", str(FIXTURES / config), "--json", "--scheme", "int4", "--group-size",
            "128", "--hw-profile", "rtx3090", *flags]
    return argv


def test_qwen3_30b_a3b_sizes_match_hand_arithmetic(capsys):
    assert main(_plan("qwen3_30b_a3b_config.json", "--expert-hit-rate", "0.25")) in (0, 1)
    plan = json.loads(capsys.readouterr().out)
    layers, experts, top_k, hidden, inter = 48, 128, 8, 2048, 768
    per_expert = 3 * inter * hidden  # gate, up, down
    attention = 2 * (32 * 128 * hidden) + 2 * (4 * 128 * hidden)  # q, o; k, v
    embedding = 151936 * hidden
    assert plan["weights"]["expert_bytes"] == per_expert * INT4_G128 == 2_433_024
    assert plan["weights"]["experts"] == layers * experts * per_expert * INT4_G128
    assert plan["weights"]["linear_layers"] == layers * attention * INT4_G128
    assert plan["weights"]["lm_head"] == embedding * INT4_G128
    norms_routers = layers * (2 * hidden + 2 * 128 + experts * hidden) + hidden
    total = layers * (attention + experts * per_expert) + 2 * embedding + norms_routers
    assert plan["model"]["total_params"] == total  # 30.53B
    assert plan["model"]["active_params"] == total - layers * (experts - top_k) * per_expert
    pred = plan["prediction"]
    assert pred["experts_per_step"] == layers * top_k
    assert pred["expert_stream_bytes_per_step"] == round(layers * top_k * 0.75 * 2_433_024)
    # the experts' minimum: one slot per layer on top of the plain weights' ring
    slot = plan["experts"]["slot_bytes"]
    assert plan["minimum_budget"] == plan["cache"]["minimum_budget"] + layers * slot


@pytest.mark.slow
def test_deepseek_v3_plans_within_a_few_gib_of_address_space():
    """The 671B skeleton under a 6 GiB address-space limit: a layer's fused experts tensor,
    made for real, would be 30 GB (float32)."""
    limit = 6 * 2**30
    code = ("import resource, sys\n"
            f"resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))\n"
            "from offload_engine.cli.main import main\n"
            f"sys.exit(main({_plan('deepseek_v3_config.json')!r}))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode in (0, 1), result.stderr[-2000:]
    plan = json.loads(result.stdout)
    hidden, inter, experts, layers = 7168, 2048, 256, 58
    per_expert = 3 * inter * hidden
    assert plan["weights"]["experts"] == layers * experts * per_expert * INT4_G128
    attention = (1536 * hidden + 128 * 192 * 1536 + 576 * hidden + 128 * 256 * 512
                 + hidden * 128 * 128)  # q_a, q_b, kv_a, kv_b, o (MLA)
    dense_mlp = 3 * 18432 * hidden
    linears = 61 * attention + 3 * dense_mlp + layers * per_expert  # + the shared experts
    assert plan["weights"]["linear_layers"] == linears * INT4_G128
    assert round(plan["model"]["total_params"] / 1e9) == 671
