"""serve --compile: requests join and leave fixed slots of a compiled decode step, with
the greedy tokens of eager serving and of ``run``, compiling once per (batch-size bucket,
KV cache bucket).

Compiling takes tens of seconds on a shared 2-core CPU, so one compiled engine per KV
cache mode serves every case of this file (module-scoped) and the cases are few.
"""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from offload_engine.decode.api import load  # noqa: E402
from offload_engine.server.batcher import DoneEvent, ErrorEvent, Scheduler, Sequence  # noqa: E402
from offload_engine.server.sampling import SamplingParams  # noqa: E402

# different lengths with the tiny tokenizer, so the prefilled rows are padded differently
PROMPTS = ["The quick brown fox", "x", "In Python, a list is a mutable sequence type",
           "def f(x):"]
LIMITS = [9, 5, 12, 7]  # rows leave at different steps
# submitted before these steps: prompt 1 joins while 0 runs (batch bucket 1, then 2), 2 and
# 3 after both left (3 + 5 - 1 < 9 < 10), so slots are freed and reused
JOINS = {0: [0], 3: [1], 10: [2, 3]}
# int8 (one compilation less): 1 leaves slot 0 while 2 runs in slot 1, 3 takes slot 0 and
# ends at the step 2 ends (5 + 7 - 1 = 12 - 1): slot 1 is in use throughout, bucket 2
SCHEDULES = {"bf16": (JOINS, {(1, 256), (2, 256)}), "int8": ({0: [1, 2], 5: [3]}, {(2, 256)})}


def _serve(engine, joins: dict, limits=LIMITS, **scheduler_args) -> tuple:
    """Drive a Scheduler by hand; ``joins`` maps a step to the prompt indexes submitted
    before it. Returns ({index: tokens}, {index: events}, scheduler)."""
    scheduler, sequences, events, step = Scheduler(engine, **scheduler_args), {}, {}, 0
    joins = dict(joins)
    while joins or scheduler._active or scheduler._waiting:
        for i in joins.pop(step, []):
            ids = engine.tokenizer(PROMPTS[i])["input_ids"]
            sequences[i] = Sequence(ids, SamplingParams(limits[i], temperature=0),
                                    events.setdefault(i, []).append)
            scheduler.submit(sequences[i])
        scheduler.step()
        step += 1
    return {i: s.token_ids for i, s in sequences.items()}, events, scheduler


def _run_tokens(engine, limits=LIMITS) -> dict:
    """What ``run`` (engine.generate, eager) gives each prompt alone."""
    return {i: engine.generate(PROMPTS[i], greedy=True, max_new_tokens=limits[i]).token_ids
            for i in range(len(PROMPTS))}


@pytest.fixture(scope="module", params=["bf16", "int8"])
def served(request, qwen2_q):
    """(kv mode, eager tokens of the mode's schedule, run's tokens, compiled engine)."""
    mode = request.param
    # float32, as tests/test_compile.py: a compiled step keeps transformers' SDPA over its
    # static bucket, where eager decode in bfloat16 runs the C++ decode attention
    # (kernels/cpu_decode.py), which rounds differently
    with load(qwen2_q, progress=False, device="cpu", kv_cache=mode, dtype="float32") as eager:
        eager_tokens = _serve(eager, SCHEDULES[mode][0], max_batch=4)[0]
        run_tokens = _run_tokens(eager)
    with load(qwen2_q, progress=False, device="cpu", kv_cache=mode, compile=True,
              dtype="float32") as engine:
        yield mode, eager_tokens, run_tokens, engine


def test_joining_and_leaving_slots_gives_eager_and_run_tokens(served):
    from offload_engine.runtime.compile_step import compilations

    mode, eager_tokens, run_tokens, engine = served
    schedule, shapes = SCHEDULES[mode]
    before = compilations()
    compiled, events, scheduler = _serve(engine, schedule, max_batch=4)
    first = compilations() - before
    assert compiled == eager_tokens == {i: run_tokens[i] for i in compiled}
    assert all(isinstance(ev[-1], DoneEvent) for ev in events.values())
    assert len(set(run_tokens[2])) > 5  # varied tokens, or equality would mean little
    # one graph per (batch bucket, cache bucket), however requests come and go
    assert scheduler._batch.shapes == shapes
    assert first == len(shapes), f"{first} compilations for {len(shapes)} buckets"
    metrics = scheduler.metrics.snapshot()
    assert metrics["compiled"] and metrics["compile_warmup_seconds"] > 0
    # the graph holds the resident weights as constants; the cache still counts every use
    stats = engine.cache.stats
    assert stats.passes > 0 and stats.hits == stats.passes * len(engine.cache.order)
    assert metrics["max_batch_size_seen"] == 2
    if mode == "bf16":  # a second scheduler over the same engine and shapes reuses them;
        # slot 0 freed by prompt 3 and taken by prompt 0 while prompt 2 runs in slot 1
        again, _, second = _serve(engine, {0: [3, 2], 8: [0]}, max_batch=4)
        assert again == {i: run_tokens[i] for i in (3, 2, 0)}
        assert second._batch.shapes == shapes and compilations() - before == len(shapes)
        assert second.metrics.snapshot()["compile_warmup_seconds"] == 0.0  # warm


def test_a_longer_request_grows_the_bucket_once(served):
    """A request that may need more than 256 positions moves every slot to the 512 bucket
    (one compilation per batch bucket there), the running row's tokens unchanged. (It is
    cancelled after a few tokens: the bucket is chosen from prompt plus max_tokens.)"""
    from offload_engine.runtime.compile_step import compilations

    mode, _eager, run_tokens, engine = served
    if mode != "bf16":
        pytest.skip("the bucket logic does not depend on the KV mode")
    config = engine.model.config
    own = config.max_position_embeddings  # 256 for the tiny models: one bucket only
    config.max_position_embeddings = 1024  # rotary positions are computed, not stored
    try:
        alone = engine.generate(PROMPTS[1], greedy=True, max_new_tokens=10).token_ids
        before = compilations()
        scheduler, long_one = Scheduler(engine, max_batch=4), None
        first = Sequence(engine.tokenizer(PROMPTS[0])["input_ids"],
                         SamplingParams(LIMITS[0], temperature=0), lambda event: None)
        scheduler.submit(first)
        for step in range(14):  # 0 ends at step 8, the long one is cancelled after
            if step == 2:
                long_one = Sequence(engine.tokenizer(PROMPTS[1])["input_ids"],
                                    SamplingParams(400, temperature=0), lambda event: None)
                scheduler.submit(long_one)
            if long_one is not None and len(long_one.token_ids) == len(alone):
                scheduler.cancel(long_one)
            scheduler.step()
    finally:
        config.max_position_embeddings = own
    # slot 1 stays the highest in use until the long one goes: bucket 2 throughout
    assert scheduler._batch.shapes == {(1, 256), (2, 512)}
    assert compilations() - before == 1  # (1, 256) was compiled before
    assert scheduler._batch.width == 512
    assert first.token_ids == run_tokens[0] and long_one.token_ids == alone
    assert not scheduler._active


def test_concurrent_http_requests_get_runs_replies(served):
    """Through the HTTP server: concurrent completions, each the text ``run`` gives, and the
    warm-up in /metrics and /metrics/json."""
    import concurrent.futures

    from offload_engine.server.app import ServerConfig
    from tests.test_server import TIMEOUT, LiveServer, httpx

    mode, _eager, _run, engine = served
    if mode != "bf16":
        pytest.skip("the KV modes are compared at the scheduler above")
    expected = [engine.generate(PROMPTS[i], greedy=True, max_new_tokens=LIMITS[i]).text
                for i in range(2)]  # 2 at once: batch buckets 1 and 2, compiled above
    from offload_engine.runtime.compile_step import compilations

    before = compilations()
    with LiveServer(engine, ServerConfig(max_batch=4)) as live:
        def complete(i: int) -> str:
            reply = httpx.post(f"{live.url}/v1/completions", timeout=TIMEOUT, json={
                "prompt": PROMPTS[i], "max_tokens": LIMITS[i], "temperature": 0})
            assert reply.status_code == 200, reply.text
            return reply.json()["choices"][0]["text"]

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            texts = list(pool.map(complete, range(2)))
        metrics = httpx.get(f"{live.url}/metrics", timeout=TIMEOUT).text
        stats = httpx.get(f"{live.url}/metrics/json", timeout=TIMEOUT).json()
    assert texts == expected
    assert compilations() == before, "the server's thread compiled the step again"
    assert "offload_engine_compile_warmup_seconds " in metrics
    assert stats["compiled"] and stats["compile_warmup_seconds"] >= 0.0  # warm: graph reused


def test_budget_caps_a_slot_and_refuses_what_does_not_fit(qwen2_q):
    """Under --kv-budget the static cache holds --max-batch slots: a request over one
    slot's share is refused with the numbers, before anything compiles."""
    from offload_engine.runtime.compile_step import compilations

    with load(qwen2_q, progress=False, device="cpu", compile=True, kv_budget="64KiB") as e:
        before = compilations()
        scheduler = Scheduler(e, max_batch=4)
        slot = scheduler.kv_capacity.slot_tokens
        assert slot == e.kv_layout.max_tokens(64 * 1024, 4)
        assert scheduler.kv_capacity.room(10) == slot - 10
        ids = e.tokenizer(PROMPTS[0])["input_ids"]
        events: list = []
        scheduler.submit(Sequence(ids, SamplingParams(slot, temperature=0), events.append))
        scheduler.step()
    assert isinstance(events[-1], ErrorEvent) and events[-1].status == 400
    assert "--max-batch 4 slots" in events[-1].message
    assert compilations() == before


def test_compile_refuses_flash_attention():
    from offload_engine.errors import ConfigError
    from offload_engine.server.slot_batch import SlotBatch

    class Engine:  # only what SlotBatch reads before it compiles anything
        class model:
            class config:
                _attn_implementation = "flash_attention_2"

    with pytest.raises(ConfigError, match="serve --compile builds its attention mask"):
        SlotBatch(Engine, 4, None)


def test_graph_bound_counts_every_bucket_a_server_can_reach():
    from offload_engine.server.slot_batch import batch_bucket, graph_bound

    assert [batch_bucket(rows, 6) for rows in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    assert graph_bound(4, 256) == 3  # batch 1, 2, 4 x 256 tokens
    assert graph_bound(6, 1000) == 4 * 3  # 1, 2, 4, 6 x 256, 512, 1000
    assert graph_bound(8, 32768) == 4 * 8  # past dynamo's default limit of 8 graphs
