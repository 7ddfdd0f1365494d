"""The expert cache policy: replay on hand-made traces, and LFU beside LRU on a routing
trace recorded from the tiny Qwen3-MoE over real text (CPython's pydoc topics)."""

import pydoc_data.topics

import pytest
import torch
from transformers import DynamicCache

from offload_engine import load
from offload_engine.errors import ConfigError
from offload_engine.planning.expert_policy import ExpertPlan, plan_experts, replay
from offload_engine.quality.routing import record_routing
from tests.test_moe import _build


def test_replay_counts_lru_and_lfu_by_hand():
    # one layer, two slots; expert 0 is used every other token
    trace = [[[0]], [[1]], [[0]], [[2]], [[0]], [[3]], [[1]]]
    # lru: 0m 1m 0h 2m(evicts 1) 0h 3m(evicts 2) 1m(evicts 0)
    assert replay(trace, 2, "lru") == (2, 5)
    # lfu: same until 1 arrives last: 0 has 3 uses, 3 has 1 -> evict 3: still a miss
    assert replay(trace, 2, "lfu") == (2, 5)
    # the difference: a burst of new experts flushes 0 under lru, not under lfu
    burst = [[[0]], [[0]], [[1]], [[2]], [[0]]]
    assert replay(burst, 2, "lru") == (1, 4)
    assert replay(burst, 2, "lfu") == (2, 3)


def test_plan_gives_each_layer_what_the_room_allows():
    plan = plan_experts(["a", "b"], 8, 100, 650)
    assert plan.slots_per_layer == 3 and plan.arena_bytes == 600
    assert plan_experts(["a", "b"], 8, 100, None).all_resident
    with pytest.raises(ConfigError, match="one expert per layer"):
        plan_experts(["a", "b"], 8, 100, 150)
    with pytest.raises(ConfigError):
        ExpertPlan("fifo")


TRACE_TOKENS = 96


@pytest.fixture(scope="module")
def pydoc_text():
    text = pydoc_data.topics.topics["class"]
    return text


def test_lfu_beside_lru_on_a_recorded_trace(tmp_path_factory, tokenizer_dir, pydoc_text,
                                            capsys):
    """Record the routing over real text, replay both policies at 2 of 4 slots, and check
    the runtime's own counters equal the replay when it decodes the same tokens."""
    _, directory = _build("qwen3_moe", tmp_path_factory, tokenizer_dir)
    with load(directory, progress=False) as engine:
        ids = engine.tokenizer(pydoc_text, return_tensors="pt")["input_ids"][:, :TRACE_TOKENS]
        trace = record_routing(engine.model, ids)
        dense_bytes, floor = engine.plan.total_bytes, engine.stats["expert_minimum_bytes"]
    assert len(trace) == TRACE_TOKENS and len(trace[0]) == 2 and len(trace[0][0]) == 2
    rates = {}
    for policy in ("lfu", "lru"):
        hits, misses = replay(trace, 2, policy)
        assert hits + misses == TRACE_TOKENS * 2 * 2
        rates[policy] = hits / (hits + misses)
    with capsys.disabled():
        print(f"\nexpert hit rate, 2 of 4 slots per layer, {TRACE_TOKENS} tokens of pydoc "
              f"text: lfu {rates['lfu']:.1%}, lru {rates['lru']:.1%}")
    # the runtime at 2 slots per layer, decoding the same tokens one by one, counts the same
    # (without the next-layer prefetch, which replay does not model)
    with load(directory, progress=False, expert_policy="lfu", expert_prefetch="off",
              gpu_budget=dense_bytes + 2 * floor) as engine, torch.no_grad():
        assert engine.stats["expert_slots_per_layer"] == 2
        cache = DynamicCache()
        for t in range(TRACE_TOKENS):
            engine.model(ids[:, t:t + 1], cache=cache, use_cache=True)
        stats = engine.cache.stats
    assert stats.expert_hits / (stats.expert_hits + stats.expert_misses) == rates["lfu"]


def test_a_fixed_resident_set_on_a_trace():
    from offload_engine.planning.expert_policy import most_used, static_hits

    trace = [[[0, 1], [2, 3]], [[1, 2], [2, 0]], [[1, 3], [2, 1]]]  # token, layer, experts
    assert most_used(trace, 1) == [{1}, {2}]
    assert most_used(trace, 2) == [{1, 0}, {2, 0}]  # ties: the lower index
    assert static_hits(trace, [{1}, {2}]) == (3 + 3, 12)
    assert static_hits(trace, [{0}, {0}]) == (1 + 1, 12)
