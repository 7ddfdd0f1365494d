"""The OpenAI-compatible server on loopback with a tiny Qwen2, driven by the openai client."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from offload_engine.decode.api import load  # noqa: E402
from offload_engine.server.app import ServerConfig, create_app  # noqa: E402
from offload_engine.server.batcher import Scheduler, Sequence, TextEvent  # noqa: E402
from offload_engine.server.runner import EngineServer  # noqa: E402
from offload_engine.server.sampling import SamplingParams  # noqa: E402

TIMEOUT = 30  # seconds for any one wait; nothing should come close


class LiveServer:
    """The server `serve` runs, for create_app(engine) on a free loopback port, in a thread."""

    def __init__(self, engine, config: ServerConfig):
        import uvicorn

        self.app = create_app(engine, config)
        self.service = self.app.state.service
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = EngineServer(uvicorn.Config(self.app, log_level="warning",
                                                  timeout_graceful_shutdown=2),
                                   self.service.scheduler)
        self.thread = threading.Thread(target=self.server.run,
                                       kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + TIMEOUT
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self.thread.join(TIMEOUT)
        self.socket.close()
        assert not self.thread.is_alive(), "server did not stop"
        assert not self.service.scheduler.alive, "scheduler thread outlived the server"

    def metrics(self) -> dict:
        return httpx.get(f"{self.url}/metrics/json", timeout=TIMEOUT).json()

    def wait_metrics(self, condition) -> dict:
        deadline = time.monotonic() + TIMEOUT
        while not condition(metrics := self.metrics()):
            assert time.monotonic() < deadline, f"metrics never matched: {metrics}"
            time.sleep(0.02)
        return metrics

    def client(self, api_key: str = "unused"):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, timeout=TIMEOUT,
                             max_retries=0)


@contextlib.contextmanager
def held(scheduler: Scheduler):
    """Park the scheduler thread before its next step until the block exits."""
    gate, step = threading.Event(), scheduler.step

    def waiting_step():
        assert gate.wait(TIMEOUT), "scheduler held too long"
        step()

    scheduler.step = waiting_step
    try:
        yield
    finally:
        gate.set()
        del scheduler.step


@pytest.fixture(scope="module")
def engine(qwen2_q):
    # float32: these tests hold batched rows to runs alone token for token. In bfloat16 the
    # CPU int4 kernel path made a row joining mid-batch differ from its run alone on an
    # AVX512-BF16 machine (the reference path did not; the kernel alone was row-independent
    # for 1-33 rows), so a near tie flipped; the batching logic is what is tested here.
    with load(qwen2_q, device="cpu", progress=False, dtype="float32") as engine:
        yield engine


@pytest.fixture(scope="module")
def server(engine):
    with LiveServer(engine, ServerConfig(max_batch=4, max_queue=16)) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def model_id(server):
    return server.service.model_id


def test_models_health_and_metrics(server, client, model_id):
    assert [m.id for m in client.models.list().data] == [model_id]
    assert httpx.get(f"{server.url}/health", timeout=TIMEOUT).json()["status"] == "ok"
    metrics = server.metrics()
    for key in ("tokens_generated", "tokens_per_s", "batches_run", "max_batch_size_seen",
                "mean_batch_size", "queue_depth", "requests_served"):
        assert key in metrics
    assert {"hits", "misses", "h2d_bytes", "hit_rate"} <= set(metrics["cache"])


def test_chat_streamed_chat_and_completion(client, model_id):
    messages = [{"role": "user", "content": "Tell me about lists."}]
    whole = client.chat.completions.create(model=model_id, messages=messages, max_tokens=8,
                                           temperature=0)
    choice = whole.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert whole.usage.completion_tokens == 8
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 8

    chunks = list(client.chat.completions.create(
        model=model_id, messages=messages, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8

    completion = client.completions.create(model=model_id, prompt="A list is", max_tokens=5,
                                           temperature=0)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 5 and completion.choices[0].text


def test_stop_string_and_seed(client, model_id):
    def complete(**kwargs):
        return client.completions.create(model=model_id, prompt="The sort method", **kwargs)

    full = complete(max_tokens=24, temperature=0).choices[0].text
    start = next(i for i in range(2, len(full) - 1)
                 if "\ufffd" not in full[i:i + 2] and full[i:i + 2].strip())
    stop = full[start:start + 2]
    stopped = complete(max_tokens=24, temperature=0, stop=[stop]).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == full[:full.find(stop)]

    sampled = [complete(max_tokens=12, temperature=1.0, top_p=0.9, seed=7).choices[0].text
               for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_concurrent_requests_are_batched_and_equal_alone(server, client, model_id):
    prompts = ["def f(x):", "In Python, a list is a mutable sequence type that", "x",
               "Classes provide a means of bundling data"]
    max_tokens = [10, 6, 12, 8]  # rows leave the batch at different steps

    def ask(i):
        return client.completions.create(model=model_id, prompt=prompts[i],
                                         max_tokens=max_tokens[i], temperature=0)

    alone = [ask(i) for i in range(len(prompts))]
    before = server.metrics()
    batched = [None] * len(prompts)

    def worker(i):
        batched[i] = ask(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    with held(server.service.scheduler):
        for thread in threads:
            thread.start()
        server.wait_metrics(lambda m: m["queue_depth"] == len(prompts))
    for thread in threads:
        thread.join(TIMEOUT)
    after = server.metrics()
    assert after["max_batch_size_seen"] == len(prompts)
    forwards = after["batches_run"] - before["batches_run"]
    longest = max(reply.usage.completion_tokens for reply in batched)
    assert forwards == longest - 1  # one decode forward per step serves every row
    for one, many in zip(alone, batched, strict=True):
        assert many.choices[0].text == one.choices[0].text
        assert many.usage == one.usage


def test_rows_join_mid_batch_and_leave(engine):
    """Driving the scheduler by hand: sequences join a running batch and equal runs alone."""
    tokenizer = engine.tokenizer
    prompts = ["The quick brown fox", "def f(x):", "A tuple is an immutable sequence"]
    limits = [9, 5, 7]

    def run(joins: dict) -> dict:
        scheduler, texts, step = Scheduler(engine, max_batch=4), {}, 0
        while joins or scheduler._active:
            for i in joins.pop(step, []):
                sink = texts.setdefault(i, [])
                scheduler.submit(Sequence(tokenizer(prompts[i])["input_ids"],
                                          SamplingParams(limits[i], temperature=0),
                                          sink.append))
            scheduler.step()
            step += 1
        return {i: "".join(e.text for e in ev if isinstance(e, TextEvent))
                for i, ev in texts.items()}

    alone = {i: run({0: [i]})[i] for i in range(3)}
    assert run({0: [0], 2: [1], 3: [2]}) == alone


def test_scheduler_greedy_equals_engine_generate(engine):
    prompt = "Sorting a list in place"
    sequence = Sequence(engine.tokenizer(prompt)["input_ids"],
                        SamplingParams(10, temperature=0), lambda event: None)
    scheduler = Scheduler(engine)
    scheduler.submit(sequence)
    while scheduler._waiting or scheduler._active:
        scheduler.step()
    assert sequence.token_ids == engine.generate(prompt, max_new_tokens=10,
                                                 greedy=True).token_ids


@pytest.mark.parametrize("body, status, param, code", [
    (b"{not json", 400, None, "invalid_json"),
    (b"[1, 2]", 400, None, None),
    ({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
     404, "model", "model_not_found"),
    ({"model": "MODEL"}, 400, "messages", None),
    ({"model": "MODEL", "messages": []}, 400, "messages", None),
    ({"model": "MODEL", "messages": "hi"}, 400, "messages", None),
    ({"model": "MODEL", "messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content",
     None),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"},
     400, "max_tokens", None),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
     400, "temperature", None),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
     400, "max_tokens", None),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3},
     400, "max_tokens", None),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000},
     400, "messages", "context_length_exceeded"),
    ({"model": "MODEL", "prompt": "word " * 300, "max_tokens": 1}, 400, "prompt",
     "context_length_exceeded"),
])
def test_bad_input_gets_openai_error_and_server_keeps_serving(server, client, model_id, body,
                                                              status, param, code):
    path = "/v1/completions" if isinstance(body, dict) and "prompt" in body else \
        "/v1/chat/completions"
    if isinstance(body, dict):
        body = json.dumps({**body, "model": body["model"].replace("MODEL", model_id)})
    response = httpx.post(f"{server.url}{path}", content=body, timeout=TIMEOUT,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code)
    reply = client.chat.completions.create(model=model_id, max_tokens=2, temperature=0,
                                           messages=[{"role": "user", "content": "hi"}])
    assert reply.usage.completion_tokens == 2


def test_openai_client_sees_typed_errors(client, model_id):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_id, messages=[], max_tokens=3)


def test_queue_full_gets_429_with_retry_after(qwen2_q):
    with load(qwen2_q, device="cpu", progress=False) as engine, \
            LiveServer(engine, ServerConfig(max_batch=1, max_queue=1)) as live:
        body = {"model": live.service.model_id, "prompt": "A list", "max_tokens": 3}
        first = {}
        waiter = threading.Thread(target=lambda: first.update(
            reply=httpx.post(f"{live.url}/v1/completions", json=body, timeout=TIMEOUT)))
        with held(live.service.scheduler):
            waiter.start()
            live.wait_metrics(lambda m: m["queue_depth"] == 1)
            refused = httpx.post(f"{live.url}/v1/completions", json=body, timeout=TIMEOUT)
            assert refused.status_code == 429
            assert int(refused.headers["Retry-After"]) >= 1
            assert refused.json()["error"]["code"] == "queue_full"
            with pytest.raises(openai.RateLimitError):
                live.client().completions.create(**body)
        waiter.join(TIMEOUT)
        assert first["reply"].status_code == 200
        assert live.metrics()["requests_rejected"] == 2


def test_client_disconnect_mid_stream_drops_the_sequence(server, model_id):
    scheduler, step = server.service.scheduler, server.service.scheduler.step

    def slow_step():  # leaves the client ample time to hang up before max_tokens
        time.sleep(0.02)
        step()

    before = server.metrics()
    body = {"model": model_id, "prompt": "A dictionary", "max_tokens": 200, "stream": True,
            "temperature": 0}
    scheduler.step = slow_step
    try:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body,
                          timeout=TIMEOUT) as response:
            lines = (line for line in response.iter_lines() if line.startswith("data: "))
            assert json.loads(next(lines)[6:])["choices"][0]["finish_reason"] is None
        after = server.wait_metrics(
            lambda m: m["requests_cancelled"] > before["requests_cancelled"]
            and m["active_sequences"] == 0)
    finally:
        del scheduler.step
    assert after["requests_served"] == before["requests_served"]
    assert after["tokens_generated"] - before["tokens_generated"] < 200


def test_scheduler_error_fails_request_with_cause_and_keeps_serving(server, engine, client,
                                                                    model_id):
    def broken_forward(*args, **kwargs):
        raise RuntimeError("injected forward failure")

    engine.model.forward = broken_forward
    try:
        response = httpx.post(f"{server.url}/v1/completions", timeout=TIMEOUT,
                              json={"model": model_id, "prompt": "A set", "max_tokens": 3})
    finally:
        del engine.model.forward
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and "injected forward failure" in error["message"]
    assert client.completions.create(model=model_id, prompt="A set",
                                     max_tokens=3).usage.completion_tokens == 3

    real_forward = engine.model.forward

    def decode_fails(*args, input_ids, **kwargs):  # prefill works, the batched step fails
        if input_ids.shape[1] == 1:
            raise RuntimeError("injected decode failure")
        return real_forward(*args, input_ids=input_ids, **kwargs)

    engine.model.forward = decode_fails
    try:
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=TIMEOUT, json={
                "model": model_id, "prompt": "A set", "max_tokens": 5, "stream": True}) as reply:
            events = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
    finally:
        del engine.model.forward
    assert events[-1] == "[DONE]"
    assert "injected decode failure" in json.loads(events[-2])["error"]["message"]
    assert client.completions.create(model=model_id, prompt="A set",
                                     max_tokens=3).usage.completion_tokens == 3
    assert server.metrics()["requests_failed"] >= 2


def test_serve_command_defaults_to_loopback():
    from offload_engine.cli.main import build_parser

    args = build_parser().parse_args(["serve", "some-model"])
    assert (args.host, args.port, args.max_batch, args.max_queue) == ("127.0.0.1", 8000, 8, 64)


def test_serve_command_names_the_extra_when_fastapi_is_missing(monkeypatch):
    from offload_engine.cli import serve_cmd
    from offload_engine.errors import ConfigError

    monkeypatch.setattr(serve_cmd.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install 'offload-engine\[serve\]'"):
        serve_cmd.require_server_extras()


def test_serve_command_rejects_bad_batching_flags():
    from offload_engine.cli.main import main

    assert main(["serve", "unused-model", "--max-batch", "0"]) == 2
