"""Next-layer expert prefetch: each experts layer guesses the next layer's experts with
that layer's router and a worker copies them while it computes.

Tiny random Qwen3-MoE and Mixtral models of 4 layers (4 experts, top-2, hidden 64). On
CPU the copies are memcpy; the worker thread, the slot states and the counters are real.
"""

import threading
from collections import Counter

import pytest

from offload_engine import load
from offload_engine.checkpoint.convert import convert
from offload_engine.errors import WorkerError
from offload_engine.quant.layout import QuantSpec
from offload_engine.runtime import prefetch
from offload_engine.runtime.cache import expert_cache
from offload_engine.runtime.experts import OffloadedExperts
from tests import tiny

_BUILT = {}
WORKER = "offload-expert-prefetch"


def _build(arch, tmp_path_factory, tokenizer_dir):
    if arch not in _BUILT:
        root = tmp_path_factory.mktemp(f"prefetch-{arch}")
        config = tiny.tiny_moe_config(arch, num_hidden_layers=4)
        src = tiny.make_checkpoint(root / "src", config=config, tokenizer_dir=tokenizer_dir,
                                   shards=1)
        convert(src, root / "q", QuantSpec("int4", 32), progress=False)
        _BUILT[arch] = root / "q"
    return _BUILT[arch]


@pytest.fixture(params=("qwen3_moe", "mixtral"))
def moe(request, tmp_path_factory, tokenizer_dir):
    return _build(request.param, tmp_path_factory, tokenizer_dir)


@pytest.fixture
def qwen3_moe(tmp_path_factory, tokenizer_dir):
    return _build("qwen3_moe", tmp_path_factory, tokenizer_dir)


_BUDGETS = {}


def _budget(directory, slots: int) -> int:
    """The budget that leaves ``slots`` expert slots per layer."""
    if directory not in _BUDGETS:
        with load(directory, progress=False) as engine:
            _BUDGETS[directory] = (engine.plan.minimum_budget,
                                   engine.stats["expert_minimum_bytes"])
    plain, per_slot_row = _BUDGETS[directory]
    return plain + slots * per_slot_row


def _generate(directory, budget, prefetch: str, tokens: int = 8):
    with load(directory, progress=False, gpu_budget=budget, expert_prefetch=prefetch) as engine:
        result = engine.generate(tiny.IMPORT_PROMPT, greedy=True, max_new_tokens=tokens)
        cache = engine.cache
    return result, cache.stats  # read after close: the worker's last copies are counted


def test_greedy_tokens_are_the_same_with_and_without_prefetch(moe):
    """At the minimum budget (one slot per layer) and with two of four slots; unbounded,
    every expert is resident and nothing is prefetched (tests/test_moe.py runs it)."""
    for budget in (_budget(moe, 1), _budget(moe, 2)):
        on, stats = _generate(moe, budget, "on", tokens=6)
        off, _ = _generate(moe, budget, "off", tokens=6)
        assert on.token_ids == off.token_ids, budget
        assert stats.expert_predicted > 0 and stats.expert_prefetches > 0


def test_counters_and_stats_line_report_guesses_and_prefetch_hits(qwen3_moe):
    result, stats = _generate(qwen3_moe, _budget(qwen3_moe, 2), "on")
    assert 0 < stats.expert_predicted_used <= stats.expert_predicted
    assert 0 < stats.expert_prefetch_hits <= min(stats.expert_prefetches, stats.expert_misses)
    accuracy = stats.expert_predicted_used / stats.expert_predicted
    assert stats.as_dict()["expert_prefetch_accuracy"] == accuracy
    # guesses are scored per decoded token too (3 of the 4 layers are guessed)
    assert result.stats.expert_prefetch_accuracy is not None
    assert result.stats.experts_prefetched_per_token > 0
    assert "guesses" in result.stats.line() and "prefetched/token" in result.stats.line()
    _, off = _generate(qwen3_moe, _budget(qwen3_moe, 2), "off")
    assert off.expert_predicted == off.expert_prefetches == off.expert_prefetch_hits == 0


def test_a_prefetched_expert_is_copied_once_and_the_slots_never_overflow(qwen3_moe,
                                                                         monkeypatch):
    """Every expert copy is either a demand fetch (compute thread) or a prefetch (worker),
    never both for one use; no copy lands outside a layer's slots in the arena; no layer
    ever holds more experts than its slots."""
    copies = Counter()
    caches = []
    run = prefetch.Copier.run

    def counting_run(self, job):
        if ".experts." in job.name:
            copies[threading.current_thread().name == WORKER] += 1
            cache = caches[-1]
            start, end = cache.arena.data_ptr(), cache.arena.data_ptr() + cache.arena.numel()
            target = job.target  # packed parts, or one matrix held dequantized (float32 here)
            parts = target.components().values() if hasattr(target, "components") else [target]
            for tensor in parts:
                assert start <= tensor.data_ptr() and tensor.data_ptr() + tensor.nbytes <= end
            for layer in cache.layers.values():
                assert len(layer.where) <= len(layer.slots) == cache.plan.slots_per_layer
        return run(self, job)

    init = expert_cache.ExpertCache.__init__

    def remember(self, *args, **kwargs):
        caches.append(self)
        init(self, *args, **kwargs)

    budget = _budget(qwen3_moe, 2)
    monkeypatch.setattr(prefetch.Copier, "run", counting_run)
    monkeypatch.setattr(expert_cache.ExpertCache, "__init__", remember)
    _result, stats = _generate(qwen3_moe, budget, "on", tokens=10)
    matrices = 2  # gate_up_proj, down_proj
    assert copies[True] == stats.expert_prefetches * matrices
    assert copies[False] == (stats.expert_misses - stats.expert_prefetch_hits) * matrices
    assert stats.expert_prefetch_hits > 0
    assert len(caches) == 1 and caches[0].arena.numel() <= budget


def test_a_failed_prefetch_copy_is_raised_in_the_caller(qwen3_moe, monkeypatch):
    run = prefetch.Copier.run

    def failing_run(self, job):
        if threading.current_thread().name == WORKER:
            raise OSError("simulated copy failure")
        return run(self, job)

    monkeypatch.setattr(prefetch.Copier, "run", failing_run)
    with load(qwen3_moe, progress=False, gpu_budget=_budget(qwen3_moe, 1)) as engine:
        with pytest.raises(WorkerError, match="prefetching expert weight .*simulated copy"):
            engine.generate(tiny.IMPORT_PROMPT, greedy=True, max_new_tokens=4)


def test_a_dead_prefetch_worker_is_raised_in_the_caller(qwen3_moe, monkeypatch):
    def dying(self):
        raise RuntimeError("scheduler bug")

    monkeypatch.setattr(expert_cache.ExpertCache, "next_job", dying)
    with load(qwen3_moe, progress=False, gpu_budget=_budget(qwen3_moe, 1)) as engine:
        with pytest.raises(WorkerError, match="worker died.*scheduler bug"):
            engine.generate(tiny.IMPORT_PROMPT, greedy=True, max_new_tokens=4)


def test_prefetch_off_links_no_router_and_starts_no_worker(qwen3_moe):
    with load(qwen3_moe, progress=False, gpu_budget=_budget(qwen3_moe, 1),
              expert_prefetch="off") as engine:
        modules = [m for m in engine.model.modules() if isinstance(m, OffloadedExperts)]
        assert all(m._next is None for m in modules)
        assert not engine.cache.experts._worker.is_alive()
        assert engine.stats["expert_prefetch"] is False
    with load(qwen3_moe, progress=False, gpu_budget=_budget(qwen3_moe, 1)) as engine:
        modules = [m for m in engine.model.modules() if isinstance(m, OffloadedExperts)]
        assert [m._next is not None for m in modules] == [True, True, True, False]
        assert engine.stats["expert_prefetch"] is True


def test_the_trace_tools_guess_accuracy_is_the_runtimes_on_one_token(qwen3_moe):
    import torch

    from offload_engine.quality.routing import guess_accuracy

    ids = torch.tensor([[5, 77, 123]])
    with load(qwen3_moe, progress=False, gpu_budget=_budget(qwen3_moe, 1)) as engine:
        for t in range(ids.shape[1]):
            engine.cache.reset_stats()
            with torch.no_grad():
                engine.model(ids[:, t:t + 1])
            runtime = engine.cache.stats.expert_predicted_used, engine.cache.stats.expert_predicted
            assert runtime == guess_accuracy(engine.model, ids[:, t:t + 1])
            assert runtime[1] == 3 * 2  # three guessed layers, top-2 each


def test_a_guess_never_evicts_an_expert_used_more_often():
    from types import SimpleNamespace as Slot

    from offload_engine.planning.expert_policy import choose_prefetch_victim

    hot, cold = Slot(holder=0, last_used=1), Slot(holder=1, last_used=2)
    uses = {0: 5, 1: 1, 2: 1}
    assert choose_prefetch_victim("lfu", [hot, cold], uses, 2) is cold
    assert choose_prefetch_victim("lru", [hot, cold], uses, 2) is cold
    assert choose_prefetch_victim("lfu", [hot], uses, 2) is None
    assert choose_prefetch_victim("lfu", [hot], uses, 0) is hot
    empty = Slot(holder=None, last_used=0)
    assert choose_prefetch_victim("lfu", [hot, empty], uses, 3) is empty


def test_a_failed_demand_fetch_names_the_expert_weight(qwen3_moe, monkeypatch):
    run = prefetch.Copier.run

    def failing_run(self, job):
        if job.name.endswith("experts.down_proj.3"):
            raise OSError("simulated read failure")
        return run(self, job)

    monkeypatch.setattr(prefetch.Copier, "run", failing_run)
    with load(qwen3_moe, progress=False, gpu_budget=_budget(qwen3_moe, 1),
              expert_prefetch="off") as engine:
        with pytest.raises(WorkerError, match=r"expert weight '.*down_proj\.3'.*simulated"):
            engine.generate(tiny.IMPORT_PROMPT, greedy=True, max_new_tokens=8)
