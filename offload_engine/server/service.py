"""The served model: a loaded engine with its scheduler (ModelService), and the holder the
routes ask for it (ServedModel), which answers 503 while the model is still loading.

``serve`` binds the port and answers ``/health`` ("loading", 503) before the model is
loaded, as vLLM and llama-server do, so a client or an orchestrator can tell a server that
is starting from one that is not there.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional

from ..decode.context import context_limit
from ..decode.generate import encode_prompt
from ..decode.sampling import model_defaults
from ..errors import ConfigError, ContextLengthError
from .batcher import QueueFullError, Scheduler, Sequence
from .config import ServerConfig
from .constrain import Grammars
from .prompt_size import refuse_overlong
from .schemas import ApiError

logger = logging.getLogger(__name__)

DEFAULT_COMPLETION_TOKENS = 16  # /v1/completions without max_tokens, as OpenAI does
FALLBACK_CONTEXT = 2048  # models whose config states no context length
RETRY_AFTER_S = 1  # what a 429 (or a 503 while loading) tells the client to wait


class ModelService:
    """The one served model: its id, its tokenizer (under a lock) and its scheduler."""

    def __init__(self, engine, config: ServerConfig):
        self.engine = engine
        self.config = config
        self.model_id = config.served_model_name or Path(engine.directory).name
        self.created = int(time.time())
        self.tokenizer_lock = threading.Lock()  # shared with the scheduler's decoding
        self.scheduler = Scheduler(engine, config.max_batch, config.max_queue,
                                   self.tokenizer_lock, config.max_prefill_tokens)
        self.context = context_limit(engine, config.ctx_size)  # --ctx-size or the model's
        own = getattr(engine.model.config, "max_position_embeddings", None)
        if config.ctx_size is not None and own is not None and config.ctx_size > own:
            logger.warning("--ctx-size %d is more than the model's context of %d tokens; "
                           "serving %d", config.ctx_size, own, own)
        # what a request that sets no sampling field gets: the model's generation config
        self.sampling_defaults = model_defaults(engine.model.generation_config)
        self.grammars = Grammars(engine.tokenizer, engine.model.config.vocab_size,
                                 self.scheduler.eos_ids)

    def check_model(self, name: Optional[str]) -> None:
        """``model`` may be left out: one model is served."""
        if name is not None and name != self.model_id:
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
        context = self.context or FALLBACK_CONTEXT
        room = context - len(prompt_ids)
        kv_room = self.scheduler.kv_capacity.room(len(prompt_ids))  # None: no --kv-budget
        room = room if kv_room is None else min(room, max(kv_room, 1))
        default = self.config.default_max_tokens if chat else DEFAULT_COMPLETION_TOKENS
        wanted = requested or min(default, room)
        if self.context is not None and len(prompt_ids) + max(wanted, 1) > self.context:
            limit = "--ctx-size" if self.config.ctx_size else "this model's context"
            raise ApiError(400, f"the prompt ({len(prompt_ids)} tokens) plus max_tokens "
                                f"({max(wanted, 1)}) exceeds {limit} of {self.context} "
                                "tokens; shorten the prompt or lower max_tokens",
                           param=param, code="context_length_exceeded")
        try:
            self.scheduler.kv_capacity.check_alone(len(prompt_ids), max(wanted, 1))
        except ContextLengthError as exc:
            raise ApiError(400, str(exc), param=param, code="context_length_exceeded") from None
        return wanted

    def submit(self, prompt_ids: List[int], request, constraint=None) -> tuple:
        """Queue a request; returns (sequence, asyncio queue of its events)."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        params = request.sampling_params(request.max_tokens, self.sampling_defaults)
        sequence = Sequence(prompt_ids, params,
                            lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
                            constraint)
        try:
            self.scheduler.submit(sequence)
        except QueueFullError as exc:
            raise ApiError(429, str(exc), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        return sequence, events


class ServedModel:
    """What the routes ask for the ModelService: it is there once the model is loaded;
    before that (or when loading failed) every model route answers 503."""

    def __init__(self, config: ServerConfig, service: Optional[ModelService] = None):
        self.config = config
        self.service_or_none = service
        self.error: Optional[BaseException] = None  # why loading failed
        self.closing = False  # the server is stopping; a late engine is closed at once
        self._lock = threading.Lock()

    @property
    def status(self) -> str:
        """"ok", "loading", "failed" or "scheduler stopped" (what /health says)."""
        if self.error is not None:
            return "failed"
        service = self.service_or_none
        if service is None:
            return "loading"
        return "ok" if service.scheduler.alive else "scheduler stopped"

    @property
    def service(self) -> ModelService:
        service = self.service_or_none
        if service is not None:
            return service
        if self.error is not None:
            raise ApiError(503, f"the model failed to load: {self.error}",
                           type="server_error", code="model_load_failed")
        raise ApiError(503, "the model is still loading; retry when GET /health answers 200",
                       type="server_error", code="model_loading",
                       headers={"Retry-After": str(RETRY_AFTER_S)})

    def load(self, load_engine: Callable[[], object],
             on_loaded: Callable[[ModelService], None],
             on_failed: Callable[[BaseException], None]) -> threading.Thread:
        """Load on a thread; the scheduler starts as soon as the engine is there."""
        thread = threading.Thread(target=self._load, args=(load_engine, on_loaded, on_failed),
                                  name="offload-load", daemon=True)
        thread.start()
        return thread

    def _load(self, load_engine, on_loaded, on_failed) -> None:
        try:
            engine = load_engine()
        except BaseException as exc:  # noqa: BLE001 - the server reports it and stops
            self.error = exc
            on_failed(exc)
            return
        try:
            service = ModelService(engine, self.config)
        except BaseException as exc:  # noqa: BLE001 - as above; the engine is released
            engine.close()
            self.error = exc
            on_failed(exc)
            return
        with self._lock:
            if self.closing:
                engine.close()
                return
            service.scheduler.start()
            self.service_or_none = service
        on_loaded(service)

    def count_refusal(self) -> None:
        """A request the guard refused, counted once the model's metrics exist."""
        service = self.service_or_none
        if service is not None:
            service.scheduler.metrics.count("requests_rejected")

    def abort(self, reason: str) -> None:
        """Fail every queued or running request with a 503 (shutdown); see Scheduler.abort."""
        with self._lock:
            self.closing = True
            service = self.service_or_none
        if service is not None:
            service.scheduler.abort(reason)
