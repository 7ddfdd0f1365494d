"""One sampling path (decode/sampling.py): model defaults, transformers' processors, stops."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from offload_engine.decode.api import load
from offload_engine.decode.sampling import (
    PresenceFrequencyPenalty,
    SamplingSettings,
    logits_processors,
    model_defaults,
    resolve,
)
from offload_engine.errors import ConfigError

PROMPT = "The sort method"


def test_model_defaults_follow_generation_config():
    assert model_defaults(GenerationConfig(bos_token_id=1)).greedy  # says nothing: greedy
    said_no = model_defaults(GenerationConfig(do_sample=False, temperature=0.6,
                                              repetition_penalty=1.1))
    assert said_no.greedy and said_no.repetition_penalty == 1.1
    qwen = model_defaults(GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8,
                                           top_k=20, repetition_penalty=1.05))
    assert qwen == SamplingSettings(temperature=0.7, top_p=0.8, top_k=20,
                                    repetition_penalty=1.05)
    assert model_defaults(GenerationConfig(do_sample=True)).top_k == 0  # not HF's implicit 50
    overridden = resolve(qwen, top_k=5, temperature=None)
    assert overridden.top_k == 5 and overridden.temperature == 0.7
    assert resolve(qwen, greedy=True).greedy


@pytest.mark.parametrize("field, value, flag", [
    ("temperature", -1.0, "--temperature"), ("top_p", 0.0, "--top-p"), ("top_k", -2, "--top-k"),
    ("min_p", 1.5, "--min-p"), ("repetition_penalty", 0.0, "--repeat-penalty"),
    ("presence_penalty", 3.0, "--presence-penalty")])
def test_bad_settings_name_the_flag(field, value, flag):
    with pytest.raises(ConfigError, match=flag):
        SamplingSettings(**{field: value})


def test_warpers_keep_what_each_setting_says():
    torch.manual_seed(0)
    logits = torch.randn(1, 64)
    probs = torch.softmax(logits, -1)[0]
    ids = torch.zeros((1, 0), dtype=torch.long)

    def kept(**settings) -> set:
        scores = logits_processors(SamplingSettings(**settings), 0)(ids, logits.clone())
        return set(torch.nonzero(torch.isfinite(scores[0])).flatten().tolist())

    order = torch.argsort(probs, descending=True).tolist()
    assert kept(top_k=5) == set(order[:5])
    assert kept(min_p=0.5) == {i for i in range(64) if probs[i] >= 0.5 * probs.max()}
    mass = torch.cumsum(probs[order], 0)
    assert kept(top_p=0.6) == set(order[:int((mass < 0.6).sum()) + 1])
    assert kept(top_k=5, min_p=0.5) == set(order[:5]) & kept(min_p=0.5)


def test_presence_and_frequency_count_the_reply_only():
    scores = torch.zeros(1, 8)
    ids = torch.tensor([[3, 3, 5, 3, 3, 6]])  # prompt [3, 3, 5], reply [3, 3, 6]
    out = PresenceFrequencyPenalty(presence=1.0, frequency=0.5, prompt_length=3)(ids, scores)
    assert out[0].tolist() == [0, 0, 0, -2.0, 0, 0, -1.5, 0]


@pytest.fixture(scope="module")
def engine(qwen2_q):
    with load(qwen2_q, device="cpu", progress=False) as engine:
        yield engine


def reference_tokens(engine, prompt_ids, steps, repetition_penalty=1.0):
    """Greedy decoding with CTRL's repetition penalty over prompt and reply, written out."""
    ids = list(prompt_ids)
    with torch.inference_mode():
        for _ in range(steps):
            logits = engine.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            for token in set(ids):
                value = logits[token]
                logits[token] = value * repetition_penalty if value < 0 else \
                    value / repetition_penalty
            ids.append(int(torch.argmax(logits)))
    return ids[len(prompt_ids):]


def test_generate_applies_settings_and_model_defaults(engine):
    prompt_ids = engine.tokenizer(PROMPT)["input_ids"]
    plain = reference_tokens(engine, prompt_ids, 9)
    # the tiny model's generation config asks for no sampling: greedy by default
    assert engine.generate(PROMPT, max_new_tokens=9).token_ids == plain
    penalized = reference_tokens(engine, prompt_ids, 9, repetition_penalty=1.5)
    assert penalized != plain
    for settings in ({"top_k": 1}, {"min_p": 1.0}):  # both keep only the likeliest token
        sampled = engine.generate(PROMPT, max_new_tokens=9, temperature=2.0, seed=3,
                                  repetition_penalty=1.5, **settings)
        assert sampled.token_ids == penalized
    with pytest.raises(TypeError, match="top_q"):
        engine.generate(PROMPT, max_new_tokens=2, top_q=3)


def test_generate_stops_before_a_stop_string(engine):
    full = engine.generate(PROMPT, max_new_tokens=24, greedy=True).text
    start = next(i for i in range(2, len(full) - 1)
                 if "\ufffd" not in full[i:i + 2] and full[i:i + 2].strip())
    stop = full[start:start + 2]
    streamed = []
    result = engine.generate(PROMPT, max_new_tokens=24, greedy=True, stop=[stop],
                             on_text=streamed.append)
    assert result.text == full[:full.find(stop)] == "".join(streamed)
    assert len(result.token_ids) < 24


@pytest.mark.parametrize("settings", [
    {"temperature": 1.0},
    {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.02, "repetition_penalty": 1.2,
     "presence_penalty": 0.5}])
def test_seeded_samples_are_the_same_in_generate_and_the_server(engine, settings):
    """One path: the same processors and the same seeded draws, token for token."""
    from offload_engine.server.batcher import Scheduler, Sequence
    from offload_engine.server.sampling import SamplingParams

    expected = engine.generate(PROMPT, max_new_tokens=16, seed=7, **settings).token_ids
    sequence = Sequence(engine.tokenizer(PROMPT)["input_ids"],
                        SamplingParams(16, seed=7, **settings), lambda event: None)
    scheduler = Scheduler(engine)
    scheduler.submit(sequence)
    while scheduler._waiting or scheduler._active:
        scheduler.step()
    assert sequence.token_ids == expected
    assert expected != engine.generate(PROMPT, max_new_tokens=16, greedy=True).token_ids
