"""The server prefills the prompts admitted in one step together: one forward, one weight pass."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from offload_engine.decode.api import load  # noqa: E402
from offload_engine.server.batcher import DoneEvent, ErrorEvent, Scheduler, Sequence  # noqa: E402
from offload_engine.server.prefill import group_size  # noqa: E402
from offload_engine.server.sampling import SamplingParams  # noqa: E402

# different lengths (14, 1, 19 and 7 tokens with the tiny tokenizer): padded differently
PROMPTS = ["The quick brown fox", "x", "In Python, a list is a mutable sequence type",
           "def f(x):"]
LIMITS = [9, 5, 12, 7]  # rows leave the batch at different steps
STREAMING_BUDGET = "260KB"  # the tiny Qwen2 streams most of its weights every pass


def _ids(engine, prompt: str) -> list:
    return engine.tokenizer(prompt)["input_ids"]


def _serve(engine, joins: dict, limits=LIMITS, **scheduler_args) -> tuple:
    """Drive a Scheduler by hand; ``joins`` maps a step to the prompt indexes submitted
    before it. Returns ({index: sequence}, {index: events}, scheduler)."""
    scheduler, sequences, events, step = Scheduler(engine, **scheduler_args), {}, {}, 0
    joins = dict(joins)
    while joins or scheduler._active or scheduler._waiting:
        for i in joins.pop(step, []):
            sequences[i] = Sequence(_ids(engine, PROMPTS[i]),
                                    SamplingParams(limits[i], temperature=0),
                                    events.setdefault(i, []).append)
            scheduler.submit(sequences[i])
        scheduler.step()
        step += 1
    return sequences, events, scheduler


def _tokens(sequences: dict) -> dict:
    return {i: s.token_ids for i, s in sequences.items()}


@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_prompts_prefilled_together_give_each_reply_alone(qwen2_q, mode):
    with load(qwen2_q, progress=False, dtype="float32", device="cpu", kv_cache=mode) as engine:
        alone = {i: _serve(engine, {0: [i]}, max_batch=4)[0][i].token_ids
                 for i in range(len(PROMPTS))}
        together, _, scheduler = _serve(engine, {0: [0, 1, 2, 3]}, max_batch=4)
        # two prompts join a running batch together, padded beside the running rows
        joined, _, _ = _serve(engine, {0: [0], 2: [1, 2], 4: [3]}, max_batch=4)
    assert _tokens(together) == alone and _tokens(joined) == alone
    metrics = scheduler.metrics.snapshot()
    assert (metrics["prefills"], metrics["prefill_passes"]) == (4, 1)
    assert metrics["max_batch_size_seen"] == 4
    assert len({len(_ids(engine, p)) for p in PROMPTS}) == len(PROMPTS)  # all padded apart
    assert len(set(alone[2])) > 5  # varied tokens, or equality would mean little


def test_rows_finishing_at_their_first_token_leave_and_the_rest_go_on(qwen2_q):
    limits = [1, 6, 1, 4]  # the longest prompt (2) ends at once: the others' padding goes
    with load(qwen2_q, progress=False, dtype="float32", device="cpu") as engine:
        alone = {i: _serve(engine, {0: [i]}, limits=limits)[0][i].token_ids for i in range(4)}
        together, events, _ = _serve(engine, {0: [0, 1, 2, 3]}, limits=limits)
    assert _tokens(together) == alone
    assert all(isinstance(ev[-1], DoneEvent) for ev in events.values())


def test_one_pass_for_the_group_copies_the_weights_once(qwen2_q):
    """N prompts together: 1 prefill forward, 1/N of the bytes N lone prefills copy."""
    limits = [1] * len(PROMPTS)  # prefill only: each reply ends at its first token
    with load(qwen2_q, progress=False,
              dtype="float32", device="cpu", gpu_budget=STREAMING_BUDGET) as engine:
        copied = {}
        for cap in (1, 8192):  # a cap of 1 token forces one prompt per forward
            before, passes = engine.stats["h2d_bytes"], engine.cache.stats.passes
            _, _, scheduler = _serve(engine, {0: [0, 1, 2, 3]}, limits=limits,
                                     max_prefill_tokens=cap)
            copied[cap] = engine.stats["h2d_bytes"] - before
            metrics = scheduler.metrics.snapshot()
            assert metrics["prefill_passes"] == engine.cache.stats.passes - passes
            assert metrics["prefills"] == len(PROMPTS)
        assert metrics["prefill_passes"] == 1
        streamed = engine.stats["streamed_bytes"]
    assert streamed > 0 and copied[8192] > 0  # the budget really streams weights
    assert copied[1] == len(PROMPTS) * copied[8192]


def test_the_prefill_cap_splits_a_group_and_a_longer_prompt_still_runs(qwen2_q):
    order = [1, 3, 2, 0]  # queue order: "x", "def f(x):", then the two longest
    with load(qwen2_q, progress=False, dtype="float32", device="cpu") as engine:
        lengths = [len(_ids(engine, p)) for p in PROMPTS]
        alone = {i: _serve(engine, {0: [i]})[0][i].token_ids for i in range(len(PROMPTS))}
        cap = 2 * lengths[3]  # room for "x" and "def f(x):" padded together, no third row
        assert lengths[2] > cap  # over the cap: it must still be served, alone
        together, _, scheduler = _serve(engine, {0: order}, max_prefill_tokens=cap)
    assert _tokens(together) == alone
    metrics = scheduler.metrics.snapshot()
    assert (metrics["prefills"], metrics["prefill_passes"]) == (4, 3)  # {1, 3}, {2}, {0}
    assert metrics["max_batch_size_seen"] == 4  # the later ones joined the running rows


def test_group_size_keeps_rows_times_longest_within_the_cap():
    assert group_size([3, 5, 2], 15) == 3  # 3 x 5
    assert group_size([3, 5, 2], 14) == 2  # 3 rows x 5 > 14
    assert group_size([20, 1], 10) == 1  # over the cap alone: runs alone, never starves
    assert group_size([1, 20], 10) == 1  # the long one waits for the next step
    assert group_size([], 10) == 0


def test_a_failed_prefill_fails_its_requests_only_and_serving_goes_on(qwen2_q, monkeypatch,
                                                                     caplog):
    with load(qwen2_q, progress=False, dtype="float32", device="cpu") as engine:
        alone = {i: _serve(engine, {0: [i]})[0][i].token_ids for i in (0, 3)}
        scheduler, events = Scheduler(engine, max_batch=4), {}
        real_forward = engine.model.forward

        def prefill_fails(*args, input_ids, **kwargs):  # decode steps feed one column
            if input_ids.shape[0] > 1 and input_ids.shape[1] > 1:
                raise RuntimeError("injected prefill failure")
            return real_forward(*args, input_ids=input_ids, **kwargs)

        def submit(i: int) -> Sequence:
            sequence = Sequence(_ids(engine, PROMPTS[i]), SamplingParams(LIMITS[i],
                                                                         temperature=0),
                                events.setdefault(i, []).append)
            scheduler.submit(sequence)
            return sequence

        running = submit(0)
        scheduler.step()  # prompt 0 alone (one row): prefilled, decoding
        monkeypatch.setattr(engine.model, "forward", prefill_fails)
        submit(1), submit(2)
        scheduler.step()  # their two-row prefill fails; row 0 decodes on
        monkeypatch.undo()
        later = submit(3)
        while scheduler._active or scheduler._waiting:
            scheduler.step()
    for i in (1, 2):
        assert len(events[i]) == 1 and isinstance(events[i][0], ErrorEvent)
        assert "injected prefill failure" in events[i][0].message
    assert running.token_ids == alone[0] and isinstance(events[0][-1], DoneEvent)
    assert later.token_ids == alone[3] and isinstance(events[3][-1], DoneEvent)
    assert scheduler.metrics.snapshot()["requests_failed"] == 2
    assert any("prefill of 2 request(s) failed" in r.message for r in caplog.records)



class _BrokenConstraint:
    """A response_format constraint whose mask fails, to fail one row after the forward."""

    finished = False

    def mask(self, scores):
        raise RuntimeError("injected constraint failure")


def test_a_row_failing_at_its_first_token_fails_alone(qwen2_q):
    with load(qwen2_q, progress=False, dtype="float32", device="cpu") as engine:
        alone = _serve(engine, {0: [0]})[0][0].token_ids
        scheduler, events = Scheduler(engine), {0: [], 1: []}
        good = Sequence(_ids(engine, PROMPTS[0]), SamplingParams(LIMITS[0], temperature=0),
                        events[0].append)
        broken = Sequence(_ids(engine, PROMPTS[2]), SamplingParams(LIMITS[2], temperature=0),
                          events[1].append, constraint=_BrokenConstraint())
        scheduler.submit(good), scheduler.submit(broken)
        while scheduler._active or scheduler._waiting:
            scheduler.step()
    assert scheduler.metrics.snapshot()["prefill_passes"] == 1  # they shared the forward
    assert len(events[1]) == 1 and "injected constraint failure" in events[1][0].message
    assert good.token_ids == alone and isinstance(events[0][-1], DoneEvent)
