"""Requests a careless client or a hostile web page sends: each is refused alone, with a
400-level answer naming the cause, and the server keeps serving the others."""

from __future__ import annotations

import threading
import time

import pytest

from offload_engine.decode.api import load
from offload_engine.server.app import ServerConfig
from offload_engine.server.batcher import DoneEvent, ErrorEvent, Sequence
from offload_engine.server.sampling import SamplingParams
from tests.test_server import TIMEOUT, LiveServer, held, httpx  # also skips without the extra

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def engine(qwen2_q):
    with load(qwen2_q, device="cpu", progress=False) as engine:
        yield engine


@pytest.fixture(scope="module")
def live(engine):
    with LiveServer(engine, ServerConfig(max_batch=4, allowed_hosts=("my-box.lan",))) as live:
        yield live


def _post(live, path: str, body: dict, **kwargs):
    body = {"model": live.service.model_id, **body}
    return httpx.post(f"{live.url}{path}", json=body, timeout=TIMEOUT, **kwargs)


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


@pytest.mark.parametrize("seed", [99999999999999999999999, -9223372036854775809, 2**64])
def test_seed_outside_64_bits_is_refused(live, seed):
    error = _error(_post(live, "/v1/completions", {"prompt": "A set", "max_tokens": 2,
                                                   "seed": seed}), 400)
    assert error["param"] == "seed"
    assert _post(live, "/v1/completions", {"prompt": "A set", "max_tokens": 2,
                                           "seed": 2**64 - 1}).status_code == 200


def test_a_request_that_fails_to_prepare_fails_alone(live):
    """A bad request that got past the HTTP checks fails alone: the others admitted in the
    same scheduler step are served, and the queue gauge returns to 0."""
    scheduler = live.service.scheduler
    events = {"good": [], "bad": []}
    done = {"good": threading.Event(), "bad": threading.Event()}

    def emitter(name):
        def emit(event):
            events[name].append(event)
            if isinstance(event, (DoneEvent, ErrorEvent)):
                done[name].set()
        return emit

    ids = live.service.engine.tokenizer("A set")["input_ids"]
    with held(scheduler):
        scheduler.submit(Sequence(ids, SamplingParams(max_tokens=3, seed=2**70), emitter("bad")))
        scheduler.submit(Sequence(ids, SamplingParams(max_tokens=3, seed=1), emitter("good")))
    assert done["good"].wait(TIMEOUT) and done["bad"].wait(TIMEOUT)
    assert isinstance(events["good"][-1], DoneEvent)
    assert isinstance(events["bad"][-1], ErrorEvent) and "Overflow" in events["bad"][-1].message
    live.wait_metrics(lambda m: m["queue_depth"] == 0 and m["active_sequences"] == 0)


def test_tiny_top_p_keeps_the_likeliest_token(live):
    logits = torch_logits()
    sampler = SamplingParams(max_tokens=1, top_p=1e-300, seed=0).sampler([], logits.device)
    assert sampler.choose(sampler.scores(logits, [])) == int(logits.argmax())
    reply = _post(live, "/v1/completions", {"prompt": "A set", "max_tokens": 3, "top_p": 1e-300,
                                            "temperature": 1.0})
    assert reply.status_code == 200, reply.text


def torch_logits():
    import torch

    return torch.tensor([0.5, 3.0, -1.0, 2.9])


def test_empty_completion_prompt_names_prompt(live):
    for prompt in ("", [""]):
        error = _error(_post(live, "/v1/completions", {"prompt": prompt}), 400)
        assert error["param"] == "prompt" and "prompt" in error["message"]


def test_refusals_are_counted_as_rejected(live):
    before = live.metrics()["requests_rejected"]
    _error(_post(live, "/v1/completions", {"prompt": "x", "max_tokens": -1}), 400)
    _error(_post(live, "/v1/chat/completions", {"messages": []}), 400)
    _error(httpx.post(f"{live.url}/v1/completions", content=b"{}", timeout=TIMEOUT,
                      headers={"Content-Type": "text/plain"}), 415)
    assert live.metrics()["requests_rejected"] == before + 3
    text = httpx.get(f"{live.url}/metrics", timeout=TIMEOUT).text
    assert f'offload_engine_requests_total{{outcome="rejected"}} {float(before + 3)!r}' in text


def test_prompt_longer_than_the_context_is_refused_before_tokenizing(live, monkeypatch):
    """A few MiB of prompt for a 256-token context: refused within seconds (under load), and the
    tokenizer never sees more than a chunk of it."""
    from offload_engine.server import prompt_size

    tokenizer = live.service.engine.tokenizer
    seen = []
    original = type(tokenizer).__call__

    def recording(self, text, *args, **kwargs):
        seen.append(len(text) if isinstance(text, str) else -1)
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", recording)
    huge = "the quick brown fox jumps over the lazy dog. " * 80_000  # 3.6 MB
    context = live.service.context
    for path, body, param in (("/v1/completions", {"prompt": huge, "max_tokens": 1}, "prompt"),
                              ("/v1/chat/completions", {"messages": [
                                  {"role": "user", "content": huge}]}, "messages")):
        started = time.monotonic()
        error = _error(_post(live, path, body), 400)
        elapsed = time.monotonic() - started
        assert (error["param"], error["code"]) == (param, "context_length_exceeded")
        assert f"context of {context} tokens" in error["message"]
        assert elapsed < 5, f"refusing took {elapsed:.2f} s"
    assert seen and max(seen) <= context * prompt_size.CHARS_PER_CHUNK_TOKEN
    assert _post(live, "/v1/completions", {"prompt": "A set " * 20,
                                           "max_tokens": 2}).status_code == 200


def test_chunked_count_never_exceeds_the_whole_text(engine):
    """The bound is a lower bound: whenever it refuses, the whole text is longer still."""
    from offload_engine.server import prompt_size

    tokenizer = engine.tokenizer
    for piece in ("word ", "a,b;\n", "   spaces   ", "x" * 40 + " ", "1234567 89 "):
        text = piece * 400
        whole = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        for context in (16, 64, 200):
            at_least = prompt_size.tokens_beyond(tokenizer, text, context)
            assert at_least <= whole, (piece, context)
            if whole > 2 * context and len(text) > context * prompt_size.CHARS_PER_CHUNK_TOKEN:
                assert at_least > context, (piece, context)


def test_api_takes_only_json_without_a_key(live):
    url = f"{live.url}/v1/completions"
    body = b'{"model": "%s", "prompt": "A set", "max_tokens": 2}' % \
        live.service.model_id.encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded",
                         "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": content_type} if content_type else {}
        error = _error(httpx.post(url, content=body, headers=headers, timeout=TIMEOUT), 415)
        assert error["code"] == "unsupported_media_type"
    ok = httpx.post(url, content=body, timeout=TIMEOUT,
                    headers={"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200, ok.text


def test_host_header_is_checked_without_a_key(live):
    port = live.url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.nip.io"):
        for path in ("/v1/models", "/health"):
            error = _error(httpx.get(f"{live.url}{path}", headers={"Host": host},
                                     timeout=TIMEOUT), 403)
            assert error["code"] == "host_not_allowed" and "--allowed-hosts" in error["message"]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "my-box.lan",
                 f"MY-BOX.lan:{port}", "10.0.0.7"):
        reply = httpx.get(f"{live.url}/v1/models", headers={"Host": host}, timeout=TIMEOUT)
        assert reply.status_code == 200, (host, reply.text)


def test_a_key_lifts_the_browser_checks(engine):
    config = ServerConfig(api_key="k")
    with LiveServer(engine, config) as keyed:
        reply = httpx.get(f"{keyed.url}/v1/models", timeout=TIMEOUT,
                          headers={"Host": "evil.example", "Authorization": "Bearer k"})
        assert reply.status_code == 200
        reply = httpx.get(f"{keyed.url}/v1/models", headers={"Host": "evil.example"},
                          timeout=TIMEOUT)
        assert reply.status_code == 401  # the page cannot know the key


def test_docs_are_off_unless_asked(live, engine):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{live.url}{path}", timeout=TIMEOUT).status_code == 404
    with LiveServer(engine, ServerConfig(docs=True)) as documented:
        assert httpx.get(f"{documented.url}/openapi.json", timeout=TIMEOUT).status_code == 200


def test_serve_flags_for_hosts_and_docs():
    from offload_engine.cli.main import build_parser

    args = build_parser().parse_args(["serve", "m"])
    assert (args.allowed_hosts, args.docs) == ((), False)
    args = build_parser().parse_args(["serve", "m", "--allowed-hosts", "a.lan,b.lan", "--docs"])
    assert (args.allowed_hosts, args.docs) == (("a.lan", "b.lan"), True)


def test_invalid_tool_schema_is_refused_when_tool_choice_is_auto(live):
    pytest.importorskip("xgrammar")
    bad = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"city": {"type": "strin"}}}}}
    for choice in ("auto", None):
        body = {"messages": [{"role": "user", "content": "hi"}], "tools": [bad],
                "max_tokens": 2, **({"tool_choice": choice} if choice else {})}
        error = _error(_post(live, "/v1/chat/completions", body), 400)
        assert error["param"] == "tools.0.function.parameters"
        assert "strin" in error["message"] and "/project/" not in error["message"]


def test_basic_schema_check_without_xgrammar():
    from offload_engine.server.constrain import _basic_problem

    assert _basic_problem({"type": "object", "properties": {"a": {"type": "string"}}}) is None
    assert "strin" in _basic_problem({"type": "object", "properties": {"a": {"type": "strin"}}})
    assert "required" in _basic_problem({"type": "object", "required": "a"})
    assert "properties" in _basic_problem({"properties": 5})
