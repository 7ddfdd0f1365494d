"""Mixture-of-experts models: every expert's matrices quantized, only routed experts fetched.

Tiny random Qwen3-MoE, Mixtral and OLMoE models (2 layers, 4 experts, top-2, hidden 64)
saved with save_pretrained, i.e. with the per-expert keys hub checkpoints have.
"""

import pytest
import torch
from torch import nn

from offload_engine import load
from offload_engine.checkpoint.convert import convert
from offload_engine.checkpoint.format import read_manifest
from offload_engine.cli.main import main
from offload_engine.model.architecture import find_linears
from offload_engine.planning.expert_policy import replay
from offload_engine.quant.layout import QuantSpec
from offload_engine.runtime.experts import OffloadedExperts
from tests import tiny

_BUILT = {}


def _build(arch, tmp_path_factory, tokenizer_dir):
    """(source directory, quantized directory) of one tiny MoE architecture, built once."""
    if arch not in _BUILT:
        root = tmp_path_factory.mktemp(arch)
        src = tiny.make_checkpoint(root / "src", config=tiny.tiny_moe_config(arch),
                                   tokenizer_dir=tokenizer_dir, shards=1)
        convert(src, root / "q", QuantSpec("int4", 32), progress=False)
        _BUILT[arch] = src, root / "q"
    return _BUILT[arch]


@pytest.fixture(params=tiny.MOE_ARCHS)
def moe(request, tmp_path_factory, tokenizer_dir):
    return _build(request.param, tmp_path_factory, tokenizer_dir)


@pytest.fixture
def qwen3_moe(tmp_path_factory, tokenizer_dir):
    return _build("qwen3_moe", tmp_path_factory, tokenizer_dir)


def test_experts_are_quantized_one_entry_per_expert_per_matrix(moe):
    manifest = read_manifest(moe[1])
    experts = [n for n, e in manifest.tensors.items() if e.role == "expert"]
    assert len(experts) == 2 * 4 * 2  # layers x experts x (gate_up, down)
    assert "model.layers.1.mlp.experts.gate_up_proj.3.weight" in experts

    def numel(entry):
        return entry.shape[0] * entry.shape[1] if len(entry.shape) == 2 else entry.shape[0]

    quantized = sum(numel(e) for e in manifest.tensors.values() if e.quantized)
    dense = sum(numel(e) for e in manifest.tensors.values()
                if not e.quantized and e.role != "embedding")
    assert quantized / (quantized + dense) >= 0.95


def test_inspect_lists_experts_as_quantized(qwen3_moe, capsys):
    assert main(["inspect", str(qwen3_moe[1]), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "(25 quantized)" in out and "expert" in out


def test_logits_and_greedy_tokens_match_at_minimum_and_unbounded_budget(moe):
    src, directory = moe
    reference = tiny.dequantized_reference(src, directory)
    for budget in ("unbounded", tiny.moe_minimum_budget(directory)):
        tiny.assert_engine_matches(directory, reference, gpu_budget=budget, atol=1e-4)


def test_only_the_routed_experts_are_fetched(qwen3_moe):
    """At one slot per layer, the copies are exactly what replaying the routing says
    (without the next-layer prefetch, which replay does not model)."""
    directory = qwen3_moe[1]
    trace = []  # per forward, per experts layer: the experts its tokens were routed to
    tokens = []

    def record(module, args):
        if module.counts_tokens:
            trace.append([])
            tokens.append(args[0].shape[0])
        trace[-1].append(args[1].flatten().tolist())

    with load(directory, progress=False, dtype="float32",
              gpu_budget=tiny.moe_minimum_budget(directory), expert_prefetch="off") as engine:
        modules = [m for m in engine.model.modules() if isinstance(m, OffloadedExperts)]
        assert len(modules) == 2 and engine.stats["expert_slots_per_layer"] == 1
        for module in modules:
            module.register_forward_pre_hook(record)
        result = engine.generate(tiny.IMPORT_PROMPT, greedy=True, max_new_tokens=6)
        stats = engine.cache.stats
        expert_bytes = engine.stats["expert_arena_bytes"] // 2  # float32 on CPU
    hits, misses = replay(trace, 1, "lfu")
    assert (stats.expert_hits, stats.expert_misses) == (hits, misses)
    routed = sum(len(set(layer)) for step in trace for layer in step)
    assert stats.expert_hits + stats.expert_misses == routed
    assert misses < len(trace) * 2 * 4  # never every expert of every layer
    # a dequantized expert is copied in its packed form: int4 codes plus scales
    assert 0 < stats.expert_h2d_bytes < misses * expert_bytes
    assert stats.expert_tokens == sum(tokens) and len(tokens) > 1
    line = result.stats.line()  # the stats line `run` prints
    assert result.stats.experts_fetched_per_token == misses / sum(tokens)
    assert result.stats.expert_bytes_per_token == stats.expert_h2d_bytes / sum(tokens)
    assert f"experts: hit rate {hits / (hits + misses):.1%}" in line


def test_prometheus_lists_expert_counters_for_moe_models_only():
    from offload_engine.server.prometheus import render

    snapshot = {f"requests_{o}": 0 for o in ("served", "cancelled", "failed", "rejected")}
    snapshot.update(dict.fromkeys(
        ("tokens_generated", "prefills", "prefill_passes", "batches_run", "busy_seconds",
         "queue_depth", "active_sequences", "tokens_per_s", "h2d_bytes_per_token",
         "mean_batch_size", "max_batch_size_seen", "uptime_seconds"), 0))
    counters = {"hits": 3, "expert_hits": 5, "expert_misses": 2, "expert_hit_rate": 5 / 7,
                "expert_prefetch_hits": 1, "expert_prefetch_accuracy": 0.75}
    dense = render("m", {**snapshot, "cache": counters})
    moe = render("m", {**snapshot, "cache": {**counters, "expert_layers": 2}})
    assert "expert_hits_total" not in dense
    assert "expert_misses_total 2.0" in moe and "expert_hit_rate 0.714" in moe
    assert "expert_prefetch_hits_total 1.0" in moe and "expert_prefetch_accuracy 0.75" in moe


def test_unbounded_budget_keeps_every_expert_resident(qwen3_moe):
    with load(qwen3_moe[1], progress=False, dtype="float32") as engine:
        engine.generate(tiny.IMPORT_PROMPT, greedy=True, max_new_tokens=3)
        stats = engine.cache.stats
        assert engine.stats["expert_slots_per_layer"] == 4
    assert stats.expert_misses == 0 and stats.expert_h2d_bytes == 0 and stats.expert_hits > 0


def test_a_budget_below_the_moe_minimum_is_refused_with_the_numbers(qwen3_moe):
    from offload_engine.errors import ConfigError

    with pytest.raises(ConfigError, match="one expert per layer"):
        load(qwen3_moe[1], progress=False,
             dtype="float32", gpu_budget=tiny.moe_minimum_budget(qwen3_moe[1]) - 1)


def test_routers_subclassing_linear_stay_dense():
    class Router(nn.Linear):  # Llama 4 / PhiMoE style: top-k inside forward
        def forward(self, x):
            return torch.topk(super().forward(x), 1).indices

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.router = Router(8, 4, bias=False)
            self.proj = nn.Linear(8, 8)

        def get_output_embeddings(self):
            return None

    assert list(find_linears(Block(), config=object())) == ["proj"]


def test_decode_expert_bytes_per_token_equal_the_plan_at_the_measured_hit_rate(qwen3_moe):
    from transformers import DynamicCache

    from offload_engine.planning.planner import PlanRequest, describe_model, make_plan
    from offload_engine.planning.profiles import load_profile

    directory = qwen3_moe[1]
    budget = tiny.moe_minimum_budget(directory)
    ids = torch.tensor([[5, 77, 123, 9, 300, 41, 42, 250, 17, 99, 3, 64]])
    with load(directory, progress=False,
              dtype="float32", gpu_budget=budget) as engine, torch.no_grad():
        cache = DynamicCache()
        engine.model(ids[:, :4], cache=cache, use_cache=True)  # prefill: not a decode step
        engine.cache.reset_stats()
        for t in range(4, ids.shape[1]):
            engine.model(ids[:, t:t + 1], cache=cache, use_cache=True)
        stats = engine.cache.stats
    steps = ids.shape[1] - 4
    measured = stats.expert_h2d_bytes / steps
    plan = make_plan(describe_model(directory),
                     PlanRequest(load_profile("cpu"), gpu_budget=budget, dtype="float32",
                                 expert_hit_rate=stats.expert_hit_rate))
    assert plan.experts.slots_per_layer == 1 and stats.expert_misses > 0
    assert plan.prediction.expert_stream_bytes_per_step == pytest.approx(measured, abs=1)


def test_bench_sweeps_moe_budgets_with_expert_columns(qwen3_moe, tmp_path, capsys):
    import json

    assert main(["bench", str(qwen3_moe[1]), "--budgets", "min,unbounded", "--policies",
                 "static", "--tokens", "3", "--out-dir", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "exp hit" in out and "guess ok" in out  # the next-layer prefetch's accuracy
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = data["rows"] if isinstance(data, dict) else data
    by_budget = {row["budget"]: row for row in rows}
    assert set(by_budget) == {"min", "unbounded"}
    assert by_budget["min"]["experts_fetched_per_token"] > 0
    assert by_budget["unbounded"]["experts_fetched_per_token"] == 0


def test_synth_writes_experts_quantized_and_the_model_runs(tmp_path):
    tiny.tiny_moe_config("mixtral").save_pretrained(tmp_path / "cfg")
    assert main(["synth", str(tmp_path / "cfg" / "config.json"), str(tmp_path / "s"),
                 "--group-size", "32", "--no-progress"]) == 0
    roles = [e.role for e in read_manifest(tmp_path / "s").tensors.values()]
    assert roles.count("expert") == 2 * 4 * 2
    with load(tmp_path / "s", progress=False, dtype="float32") as engine:
        result = engine.generate("The class", greedy=True, max_new_tokens=3)
    assert result.stats.experts_used_per_token > 0


def test_experts_on_disk_are_read_on_demand_not_through_the_cyclic_ring(qwen3_moe):
    """--host-budget leaves experts on disk: the compute thread reads the picked ones; the
    disk ring's cyclic read-ahead (dense weights only) never waits for an expert."""
    directory = qwen3_moe[1]
    budget = tiny.moe_minimum_budget(directory)
    with load(directory, progress=False, dtype="float32", gpu_budget=budget) as engine:
        expected = engine.generate(tiny.IMPORT_PROMPT, greedy=True, max_new_tokens=6).token_ids
    with load(directory, progress=False,
              dtype="float32", gpu_budget=budget, host_budget="20KiB") as engine:
        on_disk = engine.host_plan.on_disk
        assert any(".experts." in n for n in on_disk)
        assert not any(".experts." in n for n in engine.store.ring.order)
        got = engine.generate(tiny.IMPORT_PROMPT, greedy=True, max_new_tokens=6).token_ids
        assert engine.cache.stats.disk_bytes > 0
    assert got == expected
