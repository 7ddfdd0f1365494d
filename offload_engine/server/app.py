"""The OpenAI-compatible HTTP API: routes, request checks, streaming, and serve().

Routes run on the event loop and never touch the engine: they tokenize, check, and hand a
Sequence to the Scheduler thread, then relay its events as a JSON body or server-sent events.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from importlib import resources
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import prometheus
from .batcher import DoneEvent, ErrorEvent, Sequence, TextEvent
from .config import ServerConfig
from .constrain import check_tool_schemas
from .guard import RequestGuard
from .render import Reply, sse
from .schemas import ApiError, ChatRequest, CompletionRequest, parse_body
from .service import ModelService, ServedModel
from .tools import (
    ToolStream,
    check_template,
    forced_call_schema,
    parse_tool_calls,
    template_message,
)
from .utility_routes import add_utility_routes

logger = logging.getLogger(__name__)

SHUTDOWN_MESSAGE = "the server is shutting down; retry later"

__all__ = ["ModelService", "ServerConfig", "create_app"]


async def _until_disconnect(request: Request) -> None:
    """Return when the client hangs up. The body was read already, so the next ASGI
    message this request gets is http.disconnect (uvicorn sends it when the socket closes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(service: ModelService, sequence: Sequence, events: asyncio.Queue,
                   reply: Reply, request: Request) -> dict:
    """Wait for a whole reply; cancel the sequence if its client hangs up first.

    Nothing is sent before the reply is whole, so the route would never notice a
    disconnect by itself: a watcher task listens for it and ends the wait.
    """
    parts, logprobs, done = [], [], False
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        while True:
            getter = asyncio.ensure_future(events.get())
            await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                raise ApiError(499, "the client closed the connection", code="client_closed")
            event = getter.result()
            if isinstance(event, TextEvent):
                parts.append(event.text)
                logprobs += event.logprobs
            elif isinstance(event, DoneEvent):
                done = True
                return reply.whole("".join(parts), event.finish_reason, event.prompt_tokens,
                                   event.completion_tokens, logprobs + event.logprobs)
            elif isinstance(event, ErrorEvent):
                done = True
                raise ApiError(event.status, event.message, type="server_error")
    finally:
        watcher.cancel()
        if not done:
            service.scheduler.cancel(sequence)


async def _stream(service: ModelService, sequence: Sequence, events: asyncio.Queue,
                  reply: Reply, include_usage: bool):
    """Server-sent events in OpenAI's chunk format, ending with data: [DONE].

    When the client disconnects, Starlette cancels this generator; the finally clause
    tells the scheduler, which drops the sequence at its next step.
    """
    done, held = False, ToolStream() if reply.tools else None
    try:
        if reply.chat:
            yield sse(reply.chunk(None, first=True))
        while not done:
            event = await events.get()
            if isinstance(event, TextEvent):
                text, logprobs = held.feed(event.text, event.logprobs) if held else \
                    (event.text, event.logprobs)
                if text or logprobs:
                    yield sse(reply.chunk(text, logprobs=logprobs))
            elif isinstance(event, DoneEvent):
                done = True
                finish, text, logprobs = event.finish_reason, "", event.logprobs
                if held:
                    text, held_logprobs = held.flush()
                    logprobs = held_logprobs + logprobs
                    content, calls = parse_tool_calls(text)
                    if calls:
                        text, finish = content, "tool_calls"
                        yield sse(reply.chunk(text, logprobs=logprobs, tool_calls=calls))
                        text, logprobs = "", []
                yield sse(reply.chunk(text, finish_reason=finish, logprobs=logprobs))
                if include_usage:
                    yield sse(reply.usage_chunk(event.prompt_tokens, event.completion_tokens))
            elif isinstance(event, ErrorEvent):
                done = True
                yield sse(ApiError(event.status, event.message, type="server_error").body())
        yield sse("[DONE]")
    finally:
        if not done:
            service.scheduler.cancel(sequence)


async def _complete(service: ModelService, prepared: tuple, chat: bool, request: Request):
    body, prompt_ids, constraint = prepared
    reply = Reply(service.model_id, chat=chat, logprobs=body.logprobs_wanted() is not None,
                  tools=chat and body.active_tools() is not None)
    sequence, events = service.submit(prompt_ids, body, constraint)
    if body.stream:
        return StreamingResponse(
            _stream(service, sequence, events, reply, body.include_usage),
            media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return JSONResponse(await _collect(service, sequence, events, reply, request))


def _prepare_chat(service: ModelService, raw: bytes):
    """Parse and tokenize a chat request: seconds of CPU for a huge prompt, so the routes
    run this in a worker thread and the event loop keeps answering (/health, streams)."""
    body = parse_body(raw, ChatRequest)
    service.check_model(body.model)
    requested = body.requested_max_tokens()
    messages = [template_message(m.as_template_message(), m.tool_calls) for m in body.messages]
    tools = body.active_tools()
    if tools is not None:
        check_tool_schemas(tools)
    if tools is None:
        prompt_ids = service.encode(None, messages)
    else:
        style = check_template(service.engine.tokenizer)
        prompt_ids = service.encode_with_tools(
            messages, [tool.model_dump(exclude_none=True) for tool in tools])
    body.max_tokens = service.max_tokens(prompt_ids, requested, True, "messages")
    if body.forced_call():
        if body.response_format is not None and body.response_format.type != "text":
            raise ApiError(400, "response_format cannot be combined with a forced tool call "
                                "(tool_choice required or named)", param="response_format")
        schema = forced_call_schema(tools, body.tool_choice, style)
        return body, prompt_ids, service.grammars.forced_tool_call(schema, style == "hermes")
    return body, prompt_ids, service.grammars.constraint(body.response_format)


def _prepare_completion(service: ModelService, raw: bytes):
    body = parse_body(raw, CompletionRequest)
    service.check_model(body.model)
    requested = body.requested_max_tokens()
    prompt_ids = service.encode(body.prompt_text(), None)
    body.max_tokens = service.max_tokens(prompt_ids, requested, False, "prompt")
    return body, prompt_ids, service.grammars.constraint(body.response_format)


async def _prepared(served: ServedModel, prepare, request: Request) -> tuple:
    """Read, parse and tokenize in a worker thread; a refused request (4xx) is counted as
    requests_total{outcome="rejected"}."""
    service = served.service
    try:
        return service, await run_in_threadpool(prepare, service, await request.body())
    except ApiError:
        service.scheduler.metrics.count("requests_rejected")
        raise


def _add_routes(app: FastAPI, served: ServedModel) -> None:
    def model_card(service: ModelService) -> dict:
        return {"id": service.model_id, "object": "model", "created": service.created,
                "owned_by": "offload-engine", "max_model_len": service.context}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(served.service)]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        served.service.check_model(name)
        return model_card(served.service)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        service, prepared = await _prepared(served, _prepare_chat, request)
        return await _complete(service, prepared, True, request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        service, prepared = await _prepared(served, _prepare_completion, request)
        return await _complete(service, prepared, False, request)

    static = resources.files(__package__) / "static"
    page = (static / "chat.html").read_text(encoding="utf-8")
    markdown = (static / "markdown.js").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def chat_page():  # static: it talks to the API above from the browser
        return HTMLResponse(page)

    @app.get("/static/markdown.js", include_in_schema=False)
    async def markdown_js():  # the page's Markdown renderer, shipped with the package
        return Response(markdown, media_type="text/javascript")

    @app.get("/health")
    async def health():
        status, service = served.status, served.service_or_none
        body = {"status": status, "model": service.model_id if service else None}
        if served.error is not None:
            body["error"] = str(served.error)
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics():
        service = served.service
        text = prometheus.render(service.model_id, service.scheduler.metrics.snapshot())
        return Response(text, media_type=prometheus.CONTENT_TYPE)

    @app.get("/metrics/json")
    async def metrics_json():
        service = served.service
        return {"model": service.model_id, **service.scheduler.metrics.snapshot()}

    add_utility_routes(app, served)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        error = ApiError(exc.status_code, str(exc.detail),
                         code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(_request, exc: Exception):
        logger.exception("request failed")
        error = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
        return JSONResponse(error.body(), status_code=500)


def create_app(engine=None, config: Optional[ServerConfig] = None) -> FastAPI:
    """The API around an engine; the scheduler runs while the app is being served.

    With ``engine=None`` the app answers at once, every model route with a 503 "loading",
    until ``app.state.served.load(...)`` has loaded one (what ``serve`` does)."""
    config = config or ServerConfig()
    service = ModelService(engine, config) if engine is not None else None
    served = ServedModel(config, service)

    @asynccontextmanager
    async def lifespan(_app):
        if service is not None:
            service.scheduler.start()
        try:
            yield
        finally:
            served.abort(SHUTDOWN_MESSAGE)
            running = served.service_or_none
            if running is not None:  # the loop stays free meanwhile
                await asyncio.to_thread(running.scheduler.stop)

    docs = {} if config.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="offload-engine", lifespan=lifespan, **docs)
    app.add_middleware(RequestGuard, config=config, on_refusal=served.count_refusal)
    app.state.service = service  # None until loaded (create_app(None))
    app.state.served = served
    _add_routes(app, served)
    _add_error_handlers(app)
    return app
