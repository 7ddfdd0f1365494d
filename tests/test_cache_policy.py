"""The cache policy as a pure function, on the 32B model's real weight sizes."""

import pytest

from offload_engine.errors import ConfigError
from offload_engine.planning.policy import plan_cache
from offload_engine.quant.layout import QuantSpec

GIB = 1024**3
SPEC = QuantSpec("int4", 128)
LAYER = [("q_proj", 5120, 5120), ("k_proj", 1024, 5120), ("v_proj", 1024, 5120),
         ("o_proj", 5120, 5120), ("gate_proj", 27648, 5120), ("up_proj", 27648, 5120),
         ("down_proj", 5120, 27648)]


def entries_32b():
    rows = []
    for layer in range(64):
        for name, out_features, in_features in LAYER:
            nbytes = SPEC.nbytes(out_features, in_features)
            rows.append((f"model.layers.{layer}.{name}", nbytes, nbytes))
    head = SPEC.nbytes(152064, 5120)
    rows.append(("lm_head", head, head))
    return rows


def test_unbounded_keeps_everything_resident():
    plan = plan_cache(entries_32b(), None)
    assert plan.resident_bytes == plan.total_bytes and plan.slot_count == 0
    assert plan.streamed_bytes == 0
    assert 16.4e9 < plan.total_bytes < 16.6e9  # 16.09 GB of layers + 0.40 GB lm_head


def test_lm_head_stays_resident_so_slots_fit_an_mlp_matrix():
    plan = plan_cache(entries_32b(), 8 * GIB, prefetch_depth=2)
    mlp = SPEC.nbytes(27648, 5120)
    assert "lm_head" in plan.resident
    assert plan.slot_bytes == pytest.approx(mlp, abs=256) and plan.slot_count == 3
    assert plan.arena_bytes <= 8 * GIB
    assert plan.minimum_budget == SPEC.nbytes(152064, 5120) + 3 * plan.slot_bytes


def test_more_budget_never_streams_more():
    streamed = [plan_cache(entries_32b(), gib * GIB).streamed_bytes for gib in (1, 4, 8, 12, 16)]
    assert streamed == sorted(streamed, reverse=True) and streamed[0] > streamed[-1]


def test_below_minimum_names_the_minimum_and_the_flag():
    with pytest.raises(ConfigError, match="below the minimum of .*raise --gpu-budget"):
        plan_cache(entries_32b(), 100 * 1024**2)


def test_lru_is_n_slots_of_the_largest_weight():
    plan = plan_cache(entries_32b(), None, policy="lru", cache_entries=128)
    assert plan.slot_count == 128 and plan.resident == []
    assert plan.slot_bytes == SPEC.nbytes(152064, 5120)
