"""The streaming runtime: results never depend on the budget, counters are exact,
failures surface promptly, nothing is left running."""

import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from offload_engine import load
from offload_engine.errors import ConfigError, ContextLengthError, WorkerError
from offload_engine.quant.quantize import dequantize_weight
from offload_engine.runtime.linear import OffloadedLinear

PROMPT_IDS = torch.tensor([[5, 77, 123, 9, 300, 41, 42, 250]])


def reference_model(src, engine):
    """Stock transformers model whose linear weights are the dequantized INT4 weights."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    state = model.state_dict()
    for name in engine.store:
        state[f"{name}.weight"] = dequantize_weight(engine.store[name], torch.float32)
    model.load_state_dict(state)
    model.tie_weights()
    return model.eval()


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("cache_format", ["dequantized", "packed"])
def test_logits_equal_dequantized_reference(request, arch, cache_format):
    src, quantized = request.getfixturevalue(f"{arch}_src"), request.getfixturevalue(f"{arch}_q")
    with load(quantized, progress=False,
              dtype="float32", cache_format=cache_format, cache_entries=3) as engine:
        assert all(isinstance(m, OffloadedLinear) for name, m in engine.model.named_modules()
                   if name.endswith("proj"))
        reference = reference_model(src, engine)
        with torch.no_grad():
            ours = engine.model(PROMPT_IDS).logits
            theirs = reference(PROMPT_IDS).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def _budgets(quantized, policy, depth):
    """{minimum, ~30%, ~70%, unbounded}; a share below the minimum is raised to it."""
    with load(quantized, progress=False,
              dtype="float32", policy=policy, prefetch_depth=depth) as engine:
        plan = engine.plan
    total, minimum = plan.total_bytes, plan.minimum_budget
    return {"minimum": minimum, "30%": max(int(total * 0.3), minimum),
            "70%": max(int(total * 0.7), minimum), "unbounded": None}



def _greedy(engine, steps=12):
    with torch.no_grad():
        out = engine.model.generate(PROMPT_IDS, attention_mask=torch.ones_like(PROMPT_IDS),
                                    max_new_tokens=steps, do_sample=False, pad_token_id=0)
    return out[0, PROMPT_IDS.shape[1]:].tolist()


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_greedy_tokens_identical_across_budgets_policies_depths(request, arch):
    quantized = request.getfixturevalue(f"{arch}_q")
    results = {}
    for depth in (1, 4):
        for policy in ("static", "lru"):
            for label, budget in _budgets(quantized, policy, depth).items():
                with load(quantized, progress=False,
                          dtype="float32", gpu_budget=budget, policy=policy,
                          prefetch_depth=depth) as engine:
                    results[(label, policy, depth)] = _greedy(engine)
    first = next(iter(results.values()))
    assert len(set(first)) > 3, "random model repeats one token: the test would be meaningless"
    assert all(tokens == first for tokens in results.values()), results


@pytest.mark.parametrize("fraction", [0.3, 0.7])
def test_static_bytes_per_token_equal_streamed_bytes(qwen2_q, fraction):
    with load(qwen2_q, progress=False, dtype="float32", prefetch_depth=2) as probe:
        total, minimum = probe.plan.total_bytes, probe.plan.minimum_budget
    budget = int(minimum + fraction * (total - minimum))
    with load(qwen2_q, progress=False, dtype="float32", gpu_budget=budget) as engine:
        plan = engine.plan
        assert 0 < plan.resident_bytes < plan.total_bytes
        result = engine.generate("the quick brown fox", max_new_tokens=6, greedy=True)
        stats = result.stats
        assert stats.forward_passes == result.stats.new_tokens
        assert stats.h2d_bytes_per_token == plan.total_copy_bytes - plan.resident_copy_bytes
        resident_share = len(plan.resident) / len(engine.cache.order)
        assert stats.hit_rate == pytest.approx(resident_share)
        assert engine.cache.stats.evictions == 0


def test_lru_thrashes_under_cyclic_access(qwen2_q):
    with load(qwen2_q, progress=False,
              dtype="float32", policy="lru", cache_entries=8, prefetch_depth=1) as engine:
        weights = len(engine.cache.order)
        assert 8 < weights
        stats = engine.generate("hello there", max_new_tokens=5, greedy=True).stats
        # a cyclic scan longer than an LRU cache never finds what it needs
        assert stats.hit_rate == 0.0
        assert stats.h2d_bytes_per_token == engine.plan.total_copy_bytes
        assert engine.cache.stats.evictions > 0
    with load(qwen2_q, progress=False,
              dtype="float32", policy="lru") as engine:  # unbounded: all hits after 1st
        stats = engine.generate("hello there", max_new_tokens=5, greedy=True).stats
        assert stats.hit_rate == pytest.approx(1 - 1 / stats.forward_passes)


def test_corrupt_weight_raises_promptly_naming_it(qwen2_q):
    with load(qwen2_q, progress=False,
              dtype="float32", cache_entries=3, prefetch_depth=1) as engine:
        victim = engine.cache._stream_order[len(engine.cache._stream_order) // 2]
        engine.store[victim].scales[0, 0] = float("nan")
        started = time.perf_counter()
        with pytest.raises(WorkerError, match=victim.replace(".", "\\.")) as caught:
            with torch.no_grad():
                engine.model(PROMPT_IDS)
        assert time.perf_counter() - started < 1.0
        assert "non-finite" in str(caught.value)


def test_dead_worker_raises_instead_of_hanging(qwen2_q, monkeypatch):
    with load(qwen2_q, progress=False, dtype="float32", cache_entries=3) as engine:
        def boom():
            raise SystemError("worker bug")
        engine.cache.next_job = boom  # the next loop turn dies outside any copy
        with engine.cache._cond:
            engine.cache._cond.notify_all()
        engine.cache._worker.join(2)
        with pytest.raises(WorkerError, match="worker"):
            with torch.no_grad():
                engine.model(PROMPT_IDS)


def test_budget_below_minimum_states_the_minimum(qwen2_q):
    with load(qwen2_q, progress=False, dtype="float32", prefetch_depth=2) as engine:
        minimum = engine.plan.minimum_budget
    with pytest.raises(ConfigError, match="below the minimum of") as caught:
        load(qwen2_q, progress=False, dtype="float32", prefetch_depth=2, gpu_budget=minimum - 1)
    assert "raise --gpu-budget" in str(caught.value)
    with pytest.raises(ConfigError, match="minimum of 3"):
        load(qwen2_q, progress=False, dtype="float32", prefetch_depth=2, cache_entries=2)


def test_close_stops_the_worker(qwen2_q):
    before = {t for t in threading.enumerate() if t.name == "offload-prefetch"}
    engine = load(qwen2_q, progress=False, dtype="float32", cache_entries=4)
    engine.generate("hi", max_new_tokens=2, greedy=True)
    engine.close()
    engine.close()  # twice is fine
    after = {t for t in threading.enumerate() if t.name == "offload-prefetch"}
    assert after <= before


def test_context_too_long_is_refused(qwen2_q):
    with load(qwen2_q, progress=False, dtype="float32") as engine:
        with pytest.raises(ContextLengthError, match="max-new-tokens"):
            engine.generate("word " * 50, max_new_tokens=250)


def test_a_prompt_of_no_tokens_is_refused_by_the_python_api(qwen2_q):
    with load(qwen2_q, progress=False, dtype="float32") as engine:
        with pytest.raises(ConfigError, match="encodes to no tokens"):
            engine.generate("", max_new_tokens=2)
        assert engine.generate(" ", greedy=True, max_new_tokens=2).token_ids


def test_chat_template_and_sampling_with_seed(qwen2_q):
    with load(qwen2_q, progress=False, dtype="float32", cache_entries=4) as engine:
        messages = [{"role": "user", "content": "hello"}]
        first = engine.generate(messages=messages, max_new_tokens=8, seed=3, temperature=1.0)
        again = engine.generate(messages=messages, max_new_tokens=8, seed=3, temperature=1.0)
        assert first.token_ids == again.token_ids and len(first.token_ids) >= 1


def test_profile_trace_has_named_ranges(qwen2_q, tmp_path):
    from offload_engine.runtime.profiling import RANGE_NAMES, trace_to

    path = tmp_path / "trace.json"
    with load(qwen2_q, progress=False, dtype="float32", cache_entries=3) as engine:
        with trace_to(path):
            engine.generate("hi", max_new_tokens=3, greedy=True)
    text = path.read_text()
    for name in RANGE_NAMES:
        assert f'"{name}"' in text, name


def test_embeddings_on_host_give_the_same_logits(qwen2_q):
    from offload_engine.runtime.patch import HostEmbedding

    with load(qwen2_q, progress=False, dtype="float32", cache_entries=3) as engine:
        with torch.no_grad():
            expected = engine.model(PROMPT_IDS).logits
    with load(qwen2_q, progress=False,
              dtype="float32", cache_entries=3, embeddings="host") as engine:
        embedding = engine.model.get_input_embeddings()
        assert isinstance(embedding, HostEmbedding) and embedding.weight.device.type == "cpu"
        assert "weight" not in dict(embedding.named_parameters())
        assert engine.model.device == engine.device
        with torch.no_grad():
            torch.testing.assert_close(engine.model(PROMPT_IDS).logits, expected)
        assert len(engine.generate("hello", max_new_tokens=4, greedy=True).token_ids) >= 1


def test_embeddings_on_host_refuse_tied_models(llama_q):
    with pytest.raises(ConfigError, match="untied"):
        load(llama_q, progress=False, dtype="float32", embeddings="host")
    assert not [t for t in threading.enumerate() if t.name == "offload-prefetch"]
