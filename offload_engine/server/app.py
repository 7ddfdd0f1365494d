"""The OpenAI-compatible HTTP API: routes, request checks, streaming, and serve().

Routes run on the event loop and never touch the engine: they tokenize, check, and hand a
Sequence to the Scheduler thread, then relay its events as a JSON body or server-sent events.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import List, Optional

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..decode.generate import check_context, encode_prompt
from ..errors import ConfigError, ContextLengthError
from . import prometheus
from .batcher import DoneEvent, ErrorEvent, QueueFullError, Scheduler, Sequence, TextEvent
from .config import ServerConfig
from .constrain import Grammars, check_tool_schemas
from .guard import RequestGuard
from .prompt_size import refuse_overlong
from .render import Reply, sse
from .schemas import ApiError, ChatRequest, CompletionRequest, parse_body
from .tools import (
    ToolStream,
    check_template,
    forced_call_schema,
    parse_tool_calls,
    template_message,
)

logger = logging.getLogger(__name__)

DEFAULT_COMPLETION_TOKENS = 16  # /v1/completions without max_tokens, as OpenAI does
FALLBACK_CONTEXT = 2048  # models whose config states no context length
RETRY_AFTER_S = 1  # what a 429 tells the client to wait
SHUTDOWN_MESSAGE = "the server is shutting down; retry later"

__all__ = ["ServerConfig", "create_app"]


class ModelService:
    """The one served model: its id, its tokenizer (under a lock) and its scheduler."""

    def __init__(self, engine, config: ServerConfig):
        self.engine = engine
        self.config = config
        self.model_id = Path(engine.directory).name
        self.created = int(time.time())
        self.tokenizer_lock = threading.Lock()  # shared with the scheduler's decoding
        self.scheduler = Scheduler(engine, config.max_batch, config.max_queue,
                                   self.tokenizer_lock, config.max_prefill_tokens)
        self.context = getattr(engine.model.config, "max_position_embeddings", None)
        self.grammars = Grammars(engine.tokenizer, engine.model.config.vocab_size,
                                 self.scheduler.eos_ids)

    def check_model(self, name: str) -> None:
        if name != self.model_id:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves "
                                f"{self.model_id!r}", param="model", code="model_not_found")

    def encode(self, text: Optional[str], messages: Optional[list]) -> List[int]:
        self.refuse_overlong(text, messages)
        try:
            with self.tokenizer_lock:
                ids = encode_prompt(self.engine, text, messages, chat=messages is not None)
        except ConfigError as exc:
            raise ApiError(400, f"{exc}; use /v1/completions",
                           param="messages") from None
        return ids[0].tolist()

    def refuse_overlong(self, text: Optional[str], messages: Optional[list]) -> None:
        """400 for a prompt longer than the context, before it is tokenized whole."""
        texts = [text or ""] if messages is None else [m["content"] for m in messages]
        with self.tokenizer_lock:
            refuse_overlong(self.engine.tokenizer, texts, self.context or FALLBACK_CONTEXT,
                            "prompt" if messages is None else "messages")

    def encode_with_tools(self, messages: list, tools: list) -> List[int]:
        """The chat template rendered with the tools' schemas (Qwen2.5, Llama 3.x...)."""
        self.refuse_overlong(None, messages)
        with self.tokenizer_lock:
            return list(self.engine.tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=True, return_dict=True,
            )["input_ids"])

    def max_tokens(self, prompt_ids: List[int], requested: Optional[int], chat: bool,
                   param: str) -> int:
        """The tokens to generate: as requested, else the default capped by the context."""
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty", param=param)
        room = (self.context or FALLBACK_CONTEXT) - len(prompt_ids)
        kv_room = self.scheduler.kv_capacity.room(len(prompt_ids))  # None: no --kv-budget
        room = room if kv_room is None else min(room, max(kv_room, 1))
        default = self.config.default_max_tokens if chat else DEFAULT_COMPLETION_TOKENS
        wanted = requested or min(default, room)
        try:
            check_context(self.engine, len(prompt_ids), max(wanted, 1))
        except ContextLengthError:
            raise ApiError(400, f"the prompt ({len(prompt_ids)} tokens) plus max_tokens "
                                f"({max(wanted, 1)}) exceeds this model's context of "
                                f"{self.context} tokens; shorten the prompt or lower max_tokens",
                           param=param, code="context_length_exceeded") from None
        try:
            self.scheduler.kv_capacity.check_alone(len(prompt_ids), max(wanted, 1))
        except ContextLengthError as exc:
            raise ApiError(400, str(exc), param=param, code="context_length_exceeded") from None
        return wanted

    def submit(self, prompt_ids: List[int], request, constraint=None) -> tuple:
        """Queue a request; returns (sequence, asyncio queue of its events)."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        params = request.sampling_params(request.max_tokens)
        sequence = Sequence(prompt_ids, params,
                            lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
                            constraint)
        try:
            self.scheduler.submit(sequence)
        except QueueFullError as exc:
            raise ApiError(429, str(exc), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        return sequence, events


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


async def _prepared(service: ModelService, prepare, request: Request) -> tuple:
    """Read, parse and tokenize in a worker thread; a refused request (4xx) is counted as
    requests_total{outcome="rejected"}."""
    try:
        return await run_in_threadpool(prepare, service, await request.body())
    except ApiError:
        service.scheduler.metrics.count("requests_rejected")
        raise


def _add_routes(app: FastAPI, service: ModelService) -> None:
    def model_card() -> dict:
        return {"id": service.model_id, "object": "model", "created": service.created,
                "owned_by": "offload-engine"}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        service.check_model(name)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        prepared = await _prepared(service, _prepare_chat, request)
        return await _complete(service, prepared, True, request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        prepared = await _prepared(service, _prepare_completion, request)
        return await _complete(service, prepared, False, request)

    page = (resources.files(__package__) / "static" / "chat.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def chat_page():  # static: it talks to the API above from the browser
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        alive = service.scheduler.alive
        return JSONResponse({"status": "ok" if alive else "scheduler stopped",
                             "model": service.model_id}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics():
        text = prometheus.render(service.model_id, service.scheduler.metrics.snapshot())
        return Response(text, media_type=prometheus.CONTENT_TYPE)

    @app.get("/metrics/json")
    async def metrics_json():
        return {"model": service.model_id, **service.scheduler.metrics.snapshot()}


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


def create_app(engine, config: Optional[ServerConfig] = None) -> FastAPI:
    """The API around a loaded engine; the scheduler runs while the app is being served."""
    config = config or ServerConfig()
    service = ModelService(engine, config)

    @asynccontextmanager
    async def lifespan(_app):
        service.scheduler.start()
        try:
            yield
        finally:
            service.scheduler.abort(SHUTDOWN_MESSAGE)
            await asyncio.to_thread(service.scheduler.stop)  # the loop stays free meanwhile

    docs = {} if config.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="offload-engine", lifespan=lifespan, **docs)
    app.add_middleware(RequestGuard, config=config,
                       on_refusal=lambda: service.scheduler.metrics.count("requests_rejected"))
    app.state.service = service
    _add_routes(app, service)
    _add_error_handlers(app)
    return app

