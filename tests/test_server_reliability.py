"""The server under abuse: hung-up clients, shutdown with work in flight, huge bodies, keys."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from offload_engine.decode.api import load
from offload_engine.errors import ConfigError
from offload_engine.server import app as app_module
from offload_engine.server.app import ServerConfig
from tests.test_server import TIMEOUT, LiveServer, httpx, openai  # also skips without the extra

KEY = "test-key-123"


@pytest.fixture(scope="module")
def engine(qwen2_q):
    with load(qwen2_q, device="cpu", progress=False) as engine:
        yield engine


@pytest.fixture(scope="module")
def guarded(engine):
    config = ServerConfig(max_batch=4, api_key=KEY, max_body_bytes=4096, default_max_tokens=5)
    with LiveServer(engine, config) as live:
        yield live


def _auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def _slow_steps(scheduler, seconds: float = 0.05):
    """Make every scheduler step last ``seconds`` more: long requests stay in flight."""
    step = scheduler.step

    def slow_step():
        time.sleep(seconds)
        step()

    scheduler.step = slow_step


def test_non_streaming_client_that_hangs_up_is_cancelled(guarded):
    scheduler = guarded.service.scheduler
    before = guarded.metrics()
    body = {"model": guarded.service.model_id, "prompt": "A dictionary", "max_tokens": 200,
            "temperature": 0}
    _slow_steps(scheduler)
    try:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the socket
            httpx.post(f"{guarded.url}/v1/completions", json=body, headers=_auth(),
                       timeout=httpx.Timeout(TIMEOUT, read=0.5))
        after = guarded.wait_metrics(
            lambda m: m["requests_cancelled"] > before["requests_cancelled"]
            and m["active_sequences"] == 0)
        time.sleep(0.3)  # several slow steps: none may decode for the dropped request
        later = guarded.metrics()
    finally:
        del scheduler.step
    assert later["tokens_generated"] == after["tokens_generated"]
    assert after["tokens_generated"] - before["tokens_generated"] < 200
    assert after["requests_served"] == before["requests_served"]


def test_shutdown_with_work_in_flight_ends_within_5_s(engine):
    live = LiveServer(engine, ServerConfig(max_batch=4)).__enter__()
    _slow_steps(live.service.scheduler)  # 200 tokens would take 10 s or more
    body = {"model": live.service.model_id, "prompt": "A set", "max_tokens": 200}
    replies = {}

    def whole():
        replies["whole"] = httpx.post(f"{live.url}/v1/completions", json=body, timeout=TIMEOUT)

    def streamed():
        with httpx.stream("POST", f"{live.url}/v1/completions", json={**body, "stream": True},
                          timeout=TIMEOUT) as response:
            replies["stream"] = [line for line in response.iter_lines() if line]

    clients = [threading.Thread(target=whole), threading.Thread(target=streamed)]
    for client in clients:
        client.start()
    live.wait_metrics(lambda m: m["active_sequences"] == 2 and m["tokens_generated"] > 2)
    started = time.monotonic()
    live.server.should_exit = True  # what uvicorn's Ctrl-C handler does
    live.thread.join(TIMEOUT)
    elapsed = time.monotonic() - started
    for client in clients:
        client.join(TIMEOUT)
    live.socket.close()
    assert not live.thread.is_alive() and not live.service.scheduler.alive
    assert elapsed < 5, f"shutdown took {elapsed:.1f} s"
    assert replies["whole"].status_code == 503
    assert "shutting down" in replies["whole"].json()["error"]["message"]
    assert replies["stream"][-1] == "data: [DONE]"
    assert "shutting down" in replies["stream"][-2]


SERVE_SLOWLY = textwrap.dedent("""
    import sys, time
    from offload_engine.server.batcher import Scheduler
    step = Scheduler.step
    def slow_step(self):
        time.sleep(0.05)
        step(self)
    Scheduler.step = slow_step
    from offload_engine.cli.main import main
    sys.exit(main(sys.argv[1:]))
""")


def test_two_ctrl_c_with_work_in_flight_exit_cleanly(qwen2_q):
    """The real CLI in a subprocess: two SIGINTs, no traceback, a prompt exit."""
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE_SLOWLY, "serve", str(qwen2_q), "--device", "cpu",
         "--port", "0", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        lines = [process.stdout.readline()]
        while "serving model" not in lines[-1]:
            assert lines[-1], "".join(lines)  # the server exited before serving
            lines.append(process.stdout.readline())
        banner = lines[-1]
        url = banner.split(" at ")[1].split()[0]
        body = {"model": qwen2_q.name, "prompt": "A list", "max_tokens": 200}
        waiter = threading.Thread(target=lambda: httpx.post(f"{url}/completions", json=body,
                                                            timeout=TIMEOUT), daemon=True)
        waiter.start()
        deadline = time.monotonic() + TIMEOUT
        base = url.removesuffix("/v1")
        while httpx.get(f"{base}/metrics/json", timeout=TIMEOUT).json()["active_sequences"] == 0:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.05)
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        time.sleep(0.2)
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        while line := process.stdout.readline():
            lines.append(line)
            if "Finished server process" in line:
                stopped = time.monotonic() - started
        process.wait(TIMEOUT)
        exited = time.monotonic() - started
        output = "".join(lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert "Traceback" not in output, output
    assert process.returncode == 0, output
    # Both bounds grow with how loaded this machine is now: a process that only imports
    # what the server imports and exits sets the scale (under a second idle, 19 s was seen
    # under load on a shared CI machine, none of it ours).
    teardown = _bare_teardown_seconds()
    assert stopped < 5 + 2 * teardown, f"the server took {stopped:.1f} s to stop:\n{output}"
    assert exited < 15 + 4 * teardown, (
        f"the process took {exited:.1f} s to exit (a bare import of torch and transformers "
        f"took {teardown:.1f} s to exit)")


BARE_IMPORTS = ("import time, torch, transformers.models.qwen2.modeling_qwen2, uvicorn, "
                "fastapi; print(time.monotonic(), flush=True)")


def _bare_teardown_seconds() -> float:
    """Seconds from the end of a script that imports torch and transformers to its exit."""
    process = subprocess.Popen([sys.executable, "-c", BARE_IMPORTS], stdout=subprocess.PIPE,
                               text=True)
    ended = float(process.stdout.readline())  # CLOCK_MONOTONIC: the same clock system-wide
    process.wait(TIMEOUT)
    return max(time.monotonic() - ended, 0.0)


def test_body_over_the_limit_gets_413(guarded):
    url = f"{guarded.url}/v1/completions"
    big = json.dumps({"model": guarded.service.model_id, "prompt": "x" * 5000}).encode()
    declared = httpx.post(url, content=big, headers={**_auth(), "Content-Type":
                                                     "application/json"}, timeout=TIMEOUT)

    def chunks():  # no Content-Length: counted as it arrives
        for start in range(0, len(big), 1000):
            yield big[start:start + 1000]

    chunked = httpx.post(url, content=chunks(), headers=_auth(), timeout=TIMEOUT)
    for response in (declared, chunked):
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert error["code"] == "request_too_large" and "4096" in error["message"]
    small = httpx.post(url, timeout=TIMEOUT, headers=_auth(), json={
        "model": guarded.service.model_id, "prompt": "x", "max_tokens": 2})
    assert small.status_code == 200


def test_api_key_is_required_on_the_api_only(guarded):
    model = guarded.service.model_id
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.get(f"{guarded.url}/v1/models", headers=headers, timeout=TIMEOUT)
        assert response.status_code == 401, headers
        assert response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        guarded.client("wrong").chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    reply = guarded.client(KEY).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert reply.usage.completion_tokens == 2
    assert httpx.get(f"{guarded.url}/health", timeout=TIMEOUT).status_code == 200


def test_chat_without_max_tokens_stops_at_the_default_cap(guarded):
    reply = guarded.client(KEY).chat.completions.create(
        model=guarded.service.model_id, messages=[{"role": "user", "content": "Tell me"}],
        temperature=0)
    assert reply.usage.completion_tokens <= 5
    if reply.choices[0].finish_reason == "length":
        assert reply.usage.completion_tokens == 5


def test_health_answers_while_a_prompt_is_tokenized(guarded, monkeypatch):
    """Tokenizing a huge prompt takes seconds of CPU; the event loop must stay free."""
    tokenizing, real_encode = threading.Event(), app_module.encode_prompt

    def slow_encode(*args, **kwargs):  # stands in for megabytes of text through the BPE
        tokenizing.set()
        time.sleep(3)
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(app_module, "encode_prompt", slow_encode)
    reply = {}
    asker = threading.Thread(target=lambda: reply.update(response=httpx.post(
        f"{guarded.url}/v1/completions", headers=_auth(), timeout=TIMEOUT,
        json={"model": guarded.service.model_id, "prompt": "A list", "max_tokens": 2})))
    asker.start()
    assert tokenizing.wait(TIMEOUT)
    started = time.monotonic()
    health = httpx.get(f"{guarded.url}/health", timeout=TIMEOUT)
    elapsed = time.monotonic() - started
    asker.join(TIMEOUT)
    assert health.status_code == 200 and elapsed < 1, f"/health took {elapsed:.2f} s"
    assert reply["response"].status_code == 200


def test_serve_refuses_a_taken_port_before_loading(qwen2_q, monkeypatch, capsys):
    from offload_engine.cli.main import main
    from offload_engine.decode import api

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded although the port is taken")

    monkeypatch.setattr(api, "load", no_load)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(qwen2_q), "--port", str(port), "--device", "cpu"]) == 2
    assert f"port {port} on 127.0.0.1 is already in use" in capsys.readouterr().err


def test_warns_when_exposed_without_a_key(caplog):
    from offload_engine.server.runner import warn_if_exposed

    with caplog.at_level(logging.WARNING, logger="offload_engine.server.runner"):
        for host, key in (("127.0.0.1", None), ("localhost", None), ("::1", None),
                          ("0.0.0.0", KEY)):
            warn_if_exposed(ServerConfig(host=host, api_key=key))
        assert not caplog.records
        warn_if_exposed(ServerConfig(host="0.0.0.0"))
    assert len(caplog.records) == 1 and "without an API key" in caplog.records[0].message


def test_serve_flags_build_the_config(monkeypatch):
    from offload_engine.cli.main import build_parser
    from offload_engine.server.config import API_KEY_ENV

    args = build_parser().parse_args(["serve", "m"])
    assert (args.api_key, args.max_body_size, args.default_max_tokens) == \
        (None, 8 * 1024**2, 1024)
    assert args.max_prefill_tokens == ServerConfig().max_prefill_tokens == 8192
    args = build_parser().parse_args(["serve", "m", "--max-prefill-tokens", "512"])
    assert args.max_prefill_tokens == 512
    with pytest.raises(ConfigError, match="--max-prefill-tokens must be at least 1"):
        ServerConfig(max_prefill_tokens=0)
    args = build_parser().parse_args(["serve", "m", "--max-body-size", "1MiB", "--api-key", "k"])
    assert args.max_body_size == 1024**2
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert ServerConfig.key_from_env(None) == "from-env"
    assert ServerConfig.key_from_env("k") == "k"


def test_a_client_connecting_before_uvicorn_starts_is_queued_not_refused():
    """The banner is printed before uvicorn takes over the bound socket; a client that
    connects in between must wait in the backlog, not get ConnectionRefused."""
    from offload_engine.server.runner import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    try:
        client = socket.create_connection(sock.getsockname()[:2], timeout=2)
        client.close()
    finally:
        sock.close()
