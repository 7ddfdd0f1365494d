"""Speculative decoding: greedy output never changes, the counters add up, bad drafts are
refused with what to do."""

import json

import pytest
import torch

from offload_engine import load
from offload_engine.cli import main
from offload_engine.errors import ConfigError
from offload_engine.units import format_bytes
from tests import tiny

# Repeats itself, so prompt lookup finds n-grams to propose.
PROMPT = "def add(a, b): return a + b\ndef add(a, b): return a + b\ndef add("
STEPS = 16


@pytest.fixture(scope="module")
def qwen2_draft(tmp_path_factory, qwen2_src):
    """The same tiny model at another precision: it agrees with the target often, not always."""
    from offload_engine.checkpoint.convert import convert
    from offload_engine.quant.layout import QuantSpec

    dst = tmp_path_factory.mktemp("qwen2draft") / "q"
    convert(qwen2_src, dst, QuantSpec("int4-asym", 32), progress=False)
    return dst


def _model_with_vocabulary(root, tokenizer_dir, rows: int):
    """A tiny random Qwen2 whose embedding has ``rows`` rows, with the 512-token tokenizer."""
    from transformers import AutoModelForCausalLM

    from offload_engine.checkpoint.convert import convert
    from offload_engine.quant.layout import QuantSpec

    torch.manual_seed(1)
    config = tiny.tiny_config("qwen2")
    config.vocab_size = rows
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(root / "src")
    for path in tokenizer_dir.iterdir():
        (root / "src" / path.name).write_bytes(path.read_bytes())
    convert(root / "src", root / "q", QuantSpec("int4", 64), progress=False)
    return root / "q"


@pytest.fixture(scope="module")
def other_vocab_draft(tmp_path_factory, tokenizer_dir):
    """A draft whose embedding has 384 rows: fewer than the tokenizer's 512 tokens."""
    return _model_with_vocabulary(tmp_path_factory.mktemp("othervocab"), tokenizer_dir, 384)


@pytest.fixture(scope="module")
def padded_target(tmp_path_factory, tokenizer_dir):
    """A target padded to 640 rows, as Qwen2.5-32B pads past Qwen2.5-0.5B's 151936."""
    return _model_with_vocabulary(tmp_path_factory.mktemp("padded"), tokenizer_dir, 640)


def _budgets(quantized):
    """{minimum, half, unbounded} weight budgets of the target."""
    with load(quantized, progress=False) as engine:
        plan = engine.plan
    half = max(plan.total_bytes // 2, plan.minimum_budget)
    return {"minimum": plan.minimum_budget, "half": half, "unbounded": None}


def _greedy(engine, **kwargs):
    return engine.generate(PROMPT, max_new_tokens=STEPS, greedy=True, **kwargs)


def _check_counters(result, engine):
    stats = result.stats
    assert stats.forward_passes * stats.tokens_per_pass == pytest.approx(stats.new_tokens)
    assert stats.accepted_tokens == stats.new_tokens - stats.forward_passes
    assert 0 <= stats.accepted_tokens <= stats.proposed_tokens
    assert stats.h2d_bytes == stats.forward_passes * engine.plan.streamed_bytes
    assert stats.h2d_bytes_per_generated_token == pytest.approx(
        stats.h2d_bytes / stats.new_tokens)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_lookup_greedy_identical_across_budgets(request, arch):
    quantized = request.getfixturevalue(f"{arch}_q")
    results = {}
    for label, budget in _budgets(quantized).items():
        with load(quantized, progress=False, gpu_budget=budget) as engine:
            plain = _greedy(engine)
            assert plain.stats.forward_passes == plain.stats.new_tokens == STEPS
            assert plain.stats.proposed_tokens == 0 and plain.stats.speculate == "off"
            results[(label, "off")] = plain.token_ids
            for k in (2, 8):
                result = _greedy(engine, speculate="lookup", speculate_tokens=k)
                assert result.stats.proposed_tokens > 0, "lookup proposed nothing"
                _check_counters(result, engine)
                results[(label, f"lookup{k}")] = result.token_ids
    first = results[("unbounded", "off")]
    assert len(set(first)) > 3, "random model repeats one token: the test would be meaningless"
    assert all(ids == first for ids in results.values()), results


def test_draft_greedy_identical_across_budgets(qwen2_q, qwen2_draft):
    with load(qwen2_q, progress=False) as engine:
        reference = _greedy(engine).token_ids
    with load(qwen2_q, progress=False, draft_model=str(qwen2_draft)) as engine:
        draft_bytes = engine.draft_bytes
    assert draft_bytes > 0
    for label, budget in _budgets(qwen2_q).items():
        total = None if budget is None else budget + draft_bytes
        with load(qwen2_q, progress=False, gpu_budget=total, speculate="draft",
                  speculate_tokens=4, draft_model=str(qwen2_draft)) as engine:
            if budget is not None:  # the draft's bytes came out of the target's budget
                assert engine.config.budget_bytes() == budget
            result = _greedy(engine)
            assert result.token_ids == reference, label
            _check_counters(result, engine)
            stats = result.stats
            assert stats.speculate == "draft K=4" and stats.accepted_tokens > 0
            assert stats.forward_passes < stats.new_tokens
            assert stats.draft_forward_passes >= stats.proposed_tokens // 4
            assert engine.stats["draft_device_bytes"] == draft_bytes


def test_pass_counter_agrees_with_the_cache(qwen2_q, qwen2_draft):
    """Passes come from the cache (uses of the first weight); the hook counts model calls."""
    from offload_engine.decode.speculate import count_passes

    with load(qwen2_q, progress=False, draft_model=str(qwen2_draft), speculate="draft") as engine:
        ids = engine.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
        before = engine.cache.stats.passes
        with torch.no_grad(), count_passes(engine.model, ids.shape[1]) as count:
            engine.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                  do_sample=False, pad_token_id=0,
                                  assistant_model=engine.draft.model)
        assert count.passes == engine.cache.stats.passes - before > 0


def test_sampling_with_speculation_is_reproducible(qwen2_q):
    with load(qwen2_q, progress=False, speculate="lookup") as engine:
        first = engine.generate(PROMPT, max_new_tokens=10, seed=5, temperature=1.0)
        again = engine.generate(PROMPT, max_new_tokens=10, seed=5, temperature=1.0)
    assert first.token_ids == again.token_ids and first.stats.proposed_tokens > 0
    _check_counters(first, engine)


def test_draft_with_another_vocabulary_is_refused(qwen2_q, other_vocab_draft):
    with pytest.raises(ConfigError, match="384 tokens.*512") as caught:
        load(qwen2_q, progress=False, speculate="draft", draft_model=str(other_vocab_draft))
    assert "--speculate lookup" in str(caught.value)


def test_draft_that_does_not_fit_states_the_minimum(qwen2_q, qwen2_draft):
    with load(qwen2_q, progress=False, draft_model=str(qwen2_draft)) as engine:
        draft_bytes = engine.draft_bytes
    minimum = _budgets(qwen2_q)["minimum"]
    with pytest.raises(ConfigError, match="raise --gpu-budget to at least") as caught:
        load(qwen2_q, progress=False, draft_model=str(qwen2_draft),
             gpu_budget=minimum + draft_bytes - 1)
    assert f"at least {format_bytes(minimum + draft_bytes)}" in str(caught.value)
    with load(qwen2_q, progress=False, draft_model=str(qwen2_draft),
              gpu_budget=minimum + draft_bytes) as engine:  # exactly enough loads
        assert engine.config.budget_bytes() == minimum


def test_bad_speculation_settings_name_the_flag(qwen2_q):
    with pytest.raises(ConfigError, match="--draft-model"):
        load(qwen2_q, progress=False, speculate="draft")
    with pytest.raises(ConfigError, match="--speculate-tokens"):
        load(qwen2_q, progress=False, speculate="lookup", speculate_tokens=0)
    with pytest.raises(ConfigError, match="--speculate"):
        load(qwen2_q, progress=False, speculate="medusa")
    with load(qwen2_q, progress=False) as engine:
        with pytest.raises(ConfigError, match="draft_model=DIR"):
            engine.generate("hi", max_new_tokens=2, speculate="draft")


def test_run_command_shows_speculation_stats(qwen2_q, tmp_path, capsys):
    stats_path = tmp_path / "stats.json"
    code = main(["run", str(qwen2_q), "--prompt", PROMPT, "--greedy", "--max-new-tokens", "8",
                 "--speculate", "lookup", "--speculate-tokens", "4", "--lookup-ngram", "3",
                 "--device", "cpu", "--no-progress", "--stats-json", str(stats_path)])
    assert code == 0
    err = capsys.readouterr().err
    assert "tokens/pass" in err and "lookup K=4 n=3: acceptance" in err
    stats = json.loads(stats_path.read_text())
    for key in ("forward_passes", "tokens_per_pass", "acceptance_rate", "proposed_tokens",
                "accepted_tokens", "h2d_bytes_per_generated_token"):
        assert key in stats, key


def _serve_alone(engine, prompts, limit=12, speculate=None):
    """Decode ``prompts`` through the server's scheduler; {prompt index: token ids}."""
    from offload_engine.server.batcher import Scheduler, Sequence
    from offload_engine.server.sampling import SamplingParams

    scheduler = Scheduler(engine, max_batch=4)
    params = SamplingParams(limit, temperature=0, speculate=speculate)
    sequences = [Sequence(engine.tokenizer(p)["input_ids"], params, lambda event: None)
                 for p in prompts]
    for sequence in sequences:
        scheduler.submit(sequence)
    while scheduler._waiting or scheduler._active:
        scheduler.step()
    return [s.token_ids for s in sequences], scheduler.metrics.snapshot()


def test_server_speculates_for_a_lone_sequence_only(qwen2_q):
    with load(qwen2_q, progress=False, cache_entries=4) as engine:
        plain, _ = _serve_alone(engine, [PROMPT])
        batched_plain, _ = _serve_alone(engine, [PROMPT, "the quick brown fox"])
    with load(qwen2_q, progress=False, cache_entries=4, speculate="lookup",
              speculate_tokens=4) as engine:
        before = engine.cache.stats.passes
        alone, metrics = _serve_alone(engine, [PROMPT])
        passes = engine.cache.stats.passes - before
        batched, _ = _serve_alone(engine, [PROMPT, "the quick brown fox"])
    assert alone == plain and batched == batched_plain
    assert metrics["speculative_proposed"] > 0
    # one prefill, then one pass per verify step, each keeping 1 + accepted tokens
    accepted = metrics["speculative_accepted"]
    assert passes == 1 + metrics["batches_run"]
    assert len(alone[0]) == 1 + metrics["batches_run"] + accepted


def test_a_request_chooses_speculation_over_the_server_default(qwen2_q):
    with load(qwen2_q, progress=False, cache_entries=4) as engine:  # server default: off
        plain, plain_metrics = _serve_alone(engine, [PROMPT])
        asked, asked_metrics = _serve_alone(engine, [PROMPT], speculate="lookup")
    with load(qwen2_q, progress=False, cache_entries=4, speculate="lookup") as engine:
        declined, declined_metrics = _serve_alone(engine, [PROMPT], speculate="off")
    assert asked == plain == declined
    assert plain_metrics["speculative_proposed"] == 0
    assert asked_metrics["speculative_proposed"] > 0
    # each verify step keeps 1 + accepted tokens (accepted may be 0 on a random tiny model)
    assert len(asked[0]) == 1 + asked_metrics["batches_run"] + asked_metrics["speculative_accepted"]
    assert declined_metrics["speculative_proposed"] == 0


def test_the_speculate_field_takes_off_or_lookup_only():
    from offload_engine.server.schemas import ApiError, ChatRequest, parse_body

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    chosen = parse_body(json.dumps({**body, "speculate": "lookup"}).encode(), ChatRequest)
    assert chosen.speculate == "lookup"
    with pytest.raises(ApiError) as refused:
        parse_body(json.dumps({**body, "speculate": "draft"}).encode(), ChatRequest)
    assert refused.value.status == 400 and "speculate" in str(refused.value)


def test_server_refuses_a_draft_model(qwen2_q, qwen2_draft):
    from offload_engine.server.batcher import Scheduler

    with load(qwen2_q, progress=False, speculate="draft", draft_model=str(qwen2_draft)) as engine:
        with pytest.raises(ConfigError, match="--speculate lookup only"):
            Scheduler(engine)


def test_sampled_verify_keeps_only_what_the_target_samples(qwen2_q):
    """At temperature 1e-4 sampling is the target's argmax (the logits' gaps are far wider):
    the sampled verify path (generate's and the server's) must then reproduce greedy
    decoding exactly. (Not top_p: prompt lookup drops proposals that top_p would filter
    from uniform logits, so a tiny top_p would leave nothing to verify.)"""
    from offload_engine.server.batcher import Scheduler, Sequence
    from offload_engine.server.sampling import SamplingParams

    with load(qwen2_q, progress=False, speculate="lookup", speculate_tokens=4) as engine:
        greedy = engine.generate(PROMPT, max_new_tokens=STEPS, greedy=True, speculate="off")
        sampled = engine.generate(PROMPT, max_new_tokens=STEPS, temperature=1e-4, top_p=1.0,
                                  seed=0)
        assert sampled.token_ids == greedy.token_ids and sampled.stats.proposed_tokens > 0
        sequence = Sequence(engine.tokenizer(PROMPT)["input_ids"],
                            SamplingParams(STEPS, temperature=1e-4, top_p=1.0, seed=0),
                            lambda event: None)
        scheduler = Scheduler(engine)
        scheduler.submit(sequence)
        while scheduler._waiting or scheduler._active:
            scheduler.step()
        assert sequence.token_ids == greedy.token_ids
        assert scheduler.metrics.snapshot()["speculative_proposed"] > 0


def test_draft_with_a_smaller_padded_vocabulary_drafts(padded_target, qwen2_q):
    """Same tokenizer, 512 draft rows for a 640-row target: its logits are padded with -inf.
    This random target also picks tokens past 512, which the draft sees as token 0."""
    with load(padded_target, progress=False) as engine:
        reference = _greedy(engine).token_ids
    with load(padded_target, progress=False, cache_entries=None, speculate="draft",
              draft_model=str(qwen2_q)) as engine:
        result = _greedy(engine)
        assert result.token_ids == reference and result.stats.proposed_tokens > 0
        assert engine.draft.model.config.vocab_size == 640
        _check_counters(result, engine)
        sampled = engine.generate(PROMPT, max_new_tokens=8, temperature=1.0, seed=0)
        assert len(sampled.token_ids) >= 1  # speculative sampling over 640 columns runs
