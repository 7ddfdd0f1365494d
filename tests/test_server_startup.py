"""`serve` answers while it loads, and the routes beside generation: -c, the served name,
an optional model field, /v1/embeddings, /tokenize and /detokenize."""

from __future__ import annotations

import threading

import pytest
import torch

from offload_engine.decode.api import load
from offload_engine.errors import ConfigError
from offload_engine.server.app import ServerConfig, create_app
from tests.test_server import TIMEOUT, LiveServer, httpx  # also skips without the extra


def test_serve_answers_loading_then_reports_a_failed_load(monkeypatch):
    """The port answers /health with 503 "loading" while the model loads; a load that
    fails stops the server and serve() raises its error."""
    import offload_engine.decode.api as api
    from offload_engine.server.runner import serve

    release, seen = threading.Event(), {}

    def slow_broken_load(model, config):
        assert release.wait(TIMEOUT)
        raise ConfigError(f"{model}: shard 2 is truncated")

    def probe(url: str) -> None:
        def ask():
            seen["health"] = httpx.get(f"{url}/health", timeout=TIMEOUT)
            seen["models"] = httpx.get(f"{url}/v1/models", timeout=TIMEOUT)
            release.set()
        threading.Thread(target=ask, daemon=True).start()

    monkeypatch.setattr(api, "load", slow_broken_load)
    with pytest.raises(ConfigError, match="truncated"):
        serve("some-model", None, ServerConfig(port=0), on_listening=probe)
    assert seen["health"].status_code == 503
    assert seen["health"].json()["status"] == "loading"
    assert seen["models"].status_code == 503
    assert seen["models"].json()["error"]["code"] == "model_loading"


def test_app_serves_once_loaded(qwen2_q):
    """create_app(None) answers 503 until served.load() has an engine, then 200."""
    from offload_engine.server.runner import BackgroundServer

    app = create_app(None, ServerConfig())
    release, loaded = threading.Event(), threading.Event()

    def load_engine():
        assert release.wait(TIMEOUT)
        return load(qwen2_q, device="cpu", progress=False)

    with BackgroundServer(app) as server:
        assert httpx.get(f"{server.url}/health", timeout=TIMEOUT).status_code == 503
        app.state.served.load(load_engine, lambda service: loaded.set(), pytest.fail)
        release.set()
        assert loaded.wait(TIMEOUT)
        health = httpx.get(f"{server.url}/health", timeout=TIMEOUT)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        reply = httpx.post(f"{server.url}/v1/completions", timeout=TIMEOUT,
                           json={"prompt": "A list", "max_tokens": 3})
        assert reply.status_code == 200, reply.text
    app.state.served.service.engine.close()


@pytest.fixture(scope="module")
def engine(qwen2_q):
    with load(qwen2_q, device="cpu", progress=False) as engine:
        yield engine


@pytest.fixture(scope="module")
def live(engine):
    with LiveServer(engine, ServerConfig(ctx_size=64, served_model_name="tiny")) as server:
        yield server


def test_served_name_context_and_optional_model(live):
    client = live.client()
    [card] = client.models.list().data
    assert card.id == "tiny" and card.max_model_len == 64
    reply = httpx.post(f"{live.url}/v1/chat/completions", timeout=TIMEOUT, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert reply.status_code == 200 and reply.json()["model"] == "tiny"
    too_long = httpx.post(f"{live.url}/v1/completions", timeout=TIMEOUT, json={
        "prompt": "A list", "max_tokens": 64})
    assert too_long.status_code == 400
    assert "--ctx-size of 64" in too_long.json()["error"]["message"]
    wrong = httpx.post(f"{live.url}/v1/completions", timeout=TIMEOUT, json={
        "model": "other", "prompt": "A list", "max_tokens": 2})
    assert wrong.status_code == 404


def _reference_embedding(engine, text: str) -> torch.Tensor:
    ids = engine.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        hidden = engine.model.model(input_ids=ids).last_hidden_state[0].float()  # (T, H)
    return torch.nn.functional.normalize(hidden.mean(dim=0), dim=0)


def test_embeddings_are_the_mean_pooled_last_hidden_state(live, engine):
    texts = ["A list is a sequence", "Dictionaries map keys"]
    got = live.client().embeddings.create(model="tiny", input=texts)  # base64 on the wire
    assert [d.index for d in got.data] == [0, 1]
    assert got.usage.prompt_tokens == sum(len(engine.tokenizer(t)["input_ids"]) for t in texts)
    for text, item in zip(texts, got.data, strict=True):
        assert len(item.embedding) == engine.model.config.hidden_size
        torch.testing.assert_close(torch.tensor(item.embedding),
                                   _reference_embedding(engine, text), rtol=0, atol=1e-5)
    floats = httpx.post(f"{live.url}/v1/embeddings", timeout=TIMEOUT, json={
        "input": texts[0], "encoding_format": "float"}).json()
    torch.testing.assert_close(torch.tensor(floats["data"][0]["embedding"]),
                               torch.tensor(got.data[0].embedding), rtol=0, atol=1e-6)
    refused = httpx.post(f"{live.url}/v1/embeddings", timeout=TIMEOUT, json={
        "input": "x", "dimensions": 8})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "dimensions"


def test_tokenize_and_detokenize(live, engine):
    text = "Lists hold items"
    tokens = httpx.post(f"{live.url}/tokenize", timeout=TIMEOUT, json={"prompt": text}).json()
    assert tokens["tokens"] == engine.tokenizer(text)["input_ids"]
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 64
    back = httpx.post(f"{live.url}/detokenize", timeout=TIMEOUT,
                      json={"tokens": tokens["tokens"]}).json()
    assert back["prompt"] == text
    messages = [{"role": "user", "content": text}]
    chat = httpx.post(f"{live.url}/tokenize", timeout=TIMEOUT,
                      json={"messages": messages}).json()
    assert chat["tokens"] == engine.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    both = httpx.post(f"{live.url}/tokenize", timeout=TIMEOUT,
                      json={"prompt": text, "content": text})
    assert both.status_code == 400
    bad = httpx.post(f"{live.url}/detokenize", timeout=TIMEOUT, json={"tokens": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_serve_flags():
    from offload_engine.cli.main import build_parser

    args = build_parser().parse_args(["serve", "DIR", "-c", "2048",
                                      "--served-model-name", "qwen"])
    assert (args.ctx_size, args.served_model_name) == (2048, "qwen")
    assert build_parser().parse_args(["serve", "DIR", "--max-model-len", "512"]).ctx_size == 512


def test_api_key_guards_tokenize_too(engine):
    with LiveServer(engine, ServerConfig(api_key="secret")) as server:
        url = f"{server.url}/tokenize"
        assert httpx.post(url, json={"prompt": "x"}, timeout=TIMEOUT).status_code == 401
        allowed = httpx.post(url, json={"prompt": "x"}, timeout=TIMEOUT,
                             headers={"Authorization": "Bearer secret"})
        assert allowed.status_code == 200
        assert httpx.get(f"{server.url}/health", timeout=TIMEOUT).status_code == 200
