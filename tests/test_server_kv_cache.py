"""serve --kv-cache int8/int4/k8v4: batched quantized rows, sizes, --kv-budget admission."""

from __future__ import annotations

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from offload_engine.decode.api import load  # noqa: E402
from offload_engine.planning.kv_sizes import KVLayout  # noqa: E402
from offload_engine.planning.planner import PlanRequest, describe_model, make_plan  # noqa: E402
from offload_engine.planning.profiles import load_profile  # noqa: E402
from offload_engine.server.app import ServerConfig  # noqa: E402
from offload_engine.server.batcher import ErrorEvent, Scheduler, Sequence  # noqa: E402
from offload_engine.server.kvquant import stored_bytes  # noqa: E402
from offload_engine.server.sampling import SamplingParams  # noqa: E402
from tests.test_server import TIMEOUT, LiveServer  # noqa: E402

PROMPTS = ["The quick brown fox", "def f(x):", "A tuple is an immutable sequence"]
LIMITS = [14, 6, 10]  # rows leave the batch at different steps
# Measured on the tiny Qwen2 (CPU, float32 compute), `generate` greedy over 60 tokens: the
# int8 cache first differs from the dense one at token 11 of "The quick brown fox", 8 of
# "def f(x):", 5 of "x" and 59 of "A tuple is an immutable sequence" (near-ties of this
# random model), and not within 60 tokens for the three prompts below. Served together
# through the batching server, those three must give the dense cache's tokens.
AGREEING = ["the quick brown fox", "Sorting a list in place", "In Python, a list is"]
AGREED_TOKENS = 40
SPEC_PROMPT = "def add(a, b): return a + b\ndef add(a, b): return a + b\ndef add("
# tiny Qwen2 layout (2 layers, 2 KV heads, head dim 16, float32 on CPU); its int8 cache
# holds exactly 40 tokens of one sequence, 20 each of two, in this budget
LAYOUT = KVLayout("int8", 2, 2, 16, 4)
BUDGET_40 = LAYOUT.cache_bytes(40)


def _ids(engine, prompt):
    return engine.tokenizer(prompt)["input_ids"]


def _run(engine, joins: dict, max_batch: int = 4, speculate=None, limits=LIMITS) -> tuple:
    """Drive a Scheduler by hand; ``joins`` maps a step to the prompt indexes submitted
    before it. Returns ({index: token ids}, {index: events}, scheduler)."""
    scheduler, sequences, events, step = Scheduler(engine, max_batch=max_batch), {}, {}, 0
    joins = dict(joins)
    while joins or scheduler._active or scheduler._waiting:
        for i in joins.pop(step, []):
            sink = events.setdefault(i, [])
            sequences[i] = Sequence(_ids(engine, PROMPTS[i] if speculate is None else
                                         SPEC_PROMPT),
                                    SamplingParams(limits[i], temperature=0,
                                                   speculate=speculate), sink.append)
            scheduler.submit(sequences[i])
        scheduler.step()
        step += 1
    return {i: s.token_ids for i, s in sequences.items()}, events, scheduler


@pytest.mark.parametrize("mode", ["int8", "k8v4", "int4"])
def test_batched_quantized_rows_equal_each_row_alone(qwen2_q, mode):
    with load(qwen2_q, progress=False, dtype="float32", device="cpu", kv_cache=mode) as engine:
        alone = {i: _run(engine, {0: [i]})[0][i] for i in range(3)}
        for i, tokens in alone.items():  # served alone == generate alone, same cache mode
            assert tokens == engine.generate(PROMPTS[i], max_new_tokens=LIMITS[i],
                                             greedy=True).token_ids
        together, _, scheduler = _run(engine, {0: [0, 1, 2]})
        joined_late, _, _ = _run(engine, {0: [0], 2: [1], 3: [2]})  # join mid-batch, pad
        # the longest prompt leaves first: the other rows' common padding is trimmed
        trimmed, _, _ = _run(engine, {0: [0, 1, 2]}, limits=[2, 6, 10])
    assert scheduler.metrics.snapshot()["max_batch_size_seen"] == 3
    assert together == alone and joined_late == alone
    assert trimmed == {0: alone[0][:2], 1: alone[1], 2: alone[2]}
    assert len(set(alone[0])) > 5  # varied tokens, or equality would mean little


def test_int8_server_greedy_equals_the_dense_cache(qwen2_q):
    served = {}
    for mode in ("bf16", "int8"):
        with load(qwen2_q, progress=False, dtype="float32", device="cpu", kv_cache=mode) as engine:
            scheduler = Scheduler(engine, max_batch=4)
            sequences = [Sequence(_ids(engine, p), SamplingParams(AGREED_TOKENS, temperature=0),
                                  lambda event: None) for p in AGREEING]
            for sequence in sequences:
                scheduler.submit(sequence)
            while scheduler._active or scheduler._waiting:
                scheduler.step()
            assert scheduler.metrics.snapshot()["max_batch_size_seen"] == len(AGREEING)
            served[mode] = [s.token_ids for s in sequences]
    assert [len(t) for t in served["int8"]] == [AGREED_TOKENS] * len(AGREEING)
    assert served["int8"] == served["bf16"]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_batched_cache_bytes_equal_the_planners_figure(qwen2_q, mode):
    plan = make_plan(describe_model(qwen2_q),
                     PlanRequest(load_profile("cpu"), context=64, kv_cache=mode))
    per_token = plan.memory.kv_cache_per_token
    with load(qwen2_q, progress=False, dtype="float32", device="cpu", kv_cache=mode) as engine:
        scheduler = Scheduler(engine, max_batch=4)
        for i, limit in enumerate([5, 14, 10]):  # the longest prompt leaves first
            scheduler.submit(Sequence(_ids(engine, PROMPTS[i]),
                                      SamplingParams(limit, temperature=0),
                                      lambda event: None))
        for _ in range(3):
            scheduler.step()
        batch = scheduler._batch
        width, layer = batch.mask.shape[1], batch.cache.layers[0]
        assert batch.rows == 3 and width == max(len(_ids(engine, p)) for p in PROMPTS) + 3
        assert stored_bytes(batch.cache) == per_token * width * 3
        allocated = sum(layer.nbytes for layer in batch.cache.layers)
        assert allocated == per_token * layer.capacity * 3
        # padding columns hold zero codes, scales and minimums (dequantized: exact zeros)
        shortest = int(batch.mask.sum(dim=1).argmin())
        padding = int((batch.mask[shortest] == 0).sum())
        codes, scale, minimum = layer.parts["keys"]
        assert padding > 0 and not codes[shortest, :, :padding].any()
        assert not scale[shortest, :, :padding].any() and not minimum[shortest, :, :padding].any()
        widths = []
        while scheduler._active:  # rows leave; all-padding columns are trimmed
            scheduler.step()
            if batch.rows:
                assert (batch.mask[:, 0] == 1).any()
                assert stored_bytes(batch.cache) == per_token * batch.mask.shape[1] * batch.rows
                widths.append(batch.mask.shape[1])
    # each step adds a column: a width that did not grow was trimmed
    assert any(later <= earlier for earlier, later in zip(widths, widths[1:], strict=False))


def test_lone_int8_row_speculates_with_the_same_tokens(qwen2_q):
    with load(qwen2_q, progress=False, dtype="float32", device="cpu", kv_cache="int8") as engine:
        speculated, _, scheduler = _run(engine, {0: [0]}, speculate="lookup")
        assert speculated[0] == engine.generate(SPEC_PROMPT, max_new_tokens=LIMITS[0],
                                                greedy=True).token_ids
    metrics = scheduler.metrics.snapshot()
    # proposals were verified and the rejected ones cropped off the int8 cache
    assert metrics["speculative_proposed"] > metrics["speculative_accepted"]


@pytest.mark.parametrize("mode", ["int8", "bf16"])  # the dense cache is admitted the same way
def test_rows_over_the_kv_budget_wait_and_a_request_that_never_fits_is_refused(qwen2_q, mode):
    layout = KVLayout(mode, 2, 2, 16, 4)
    with load(qwen2_q, progress=False, dtype="float32", device="cpu", kv_cache=mode,
              kv_budget=layout.cache_bytes(40)) as engine:
        assert engine.kv_layout == layout
        alone = {i: _run(engine, {0: [i]})[0][i] for i in (0, 2)}
        # each fits alone (prompt + 14 or 10 <= 40 tokens), two together need more than
        # the 20 tokens per row that two rows get: the second waits for the first
        queued, _, scheduler = _run(engine, {0: [0, 2]})
        assert queued == alone
        assert scheduler.metrics.snapshot()["max_batch_size_seen"] == 1
        scheduler = Scheduler(engine)
        events = []
        scheduler.submit(Sequence(_ids(engine, PROMPTS[0]), SamplingParams(60, temperature=0),
                                  events.append))
        scheduler.step()
    assert not scheduler._active and not scheduler._waiting
    [error] = events
    assert isinstance(error, ErrorEvent) and error.status == 400
    assert "holds 40 tokens" in error.message and "--kv-budget" in error.message


def test_http_request_over_the_kv_budget_gets_400_with_the_numbers(qwen2_q):
    with load(qwen2_q, progress=False, dtype="float32", device="cpu", kv_cache="int8",
              kv_budget=BUDGET_40) as engine, LiveServer(engine, ServerConfig()) as live:
        url, model = f"{live.url}/v1/completions", live.service.model_id
        refused = httpx.post(url, json={"model": model, "prompt": PROMPTS[0], "max_tokens": 60},
                             timeout=TIMEOUT)
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
        assert "int8" in error["message"] and "holds 40 tokens" in error["message"]
        served = httpx.post(url, json={"model": model, "prompt": PROMPTS[0], "max_tokens": 8},
                            timeout=TIMEOUT)
        assert served.status_code == 200 and served.json()["usage"]["completion_tokens"] == 8
        # a chat request without max_tokens is capped by what the budget holds, not refused
        chat = httpx.post(f"{live.url}/v1/chat/completions", timeout=TIMEOUT, json={
            "model": model, "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 200, chat.text
        usage = chat.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] <= 40
