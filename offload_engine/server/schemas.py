"""OpenAI-style request bodies, their validation, and the error body every failure returns."""

from __future__ import annotations

from typing import List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..decode.sampling import SamplingSettings, resolve
from .sampling import SamplingParams

MAX_STOP_STRINGS = 4  # as the OpenAI API allows
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs limit in the OpenAI API (completions: 5)
# what torch.Generator.manual_seed takes: any signed or unsigned 64-bit integer
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


class ApiError(Exception):
    """A request the server refuses; rendered as {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class _Strict(BaseModel):
    # strict: "5" is not an int and true is not a number. Unknown fields are refused with a
    # 400 naming them: a client that sends tools or response_format must not get a reply
    # that silently ignored them
    model_config = ConfigDict(strict=True, extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class CalledFunction(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, List[TextPart], None] = None
    tool_calls: Optional[List[ToolCall]] = None  # an assistant's earlier calls
    tool_call_id: Optional[str] = None  # a tool message: the call it answers
    name: Optional[str] = None  # a tool message: the function's name

    def as_template_message(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        message = {"role": role, "content": content or ""}
        for key in ("tool_call_id", "name"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        return message


class FunctionDef(_Strict):
    name: str
    description: Optional[str] = None
    parameters: Optional[dict] = None  # a JSON schema
    strict: Optional[bool] = None  # calls forced by tool_choice always match the schema


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Strict):
    include_usage: bool = False  # send a last chunk with the usage counts


class JsonSchemaFormat(_Strict):
    name: str
    schema_: dict = Field(default_factory=dict, alias="schema")  # {} allows any JSON value
    description: Optional[str] = None
    strict: Optional[bool] = None  # enforced either way: the grammar allows nothing else


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    def check(self) -> None:
        if self.type == "json_schema" and self.json_schema is None:
            raise ApiError(400, "response_format of type json_schema needs a json_schema "
                                "object ({\"name\": ..., \"schema\": {...}})",
                           param="response_format.json_schema")


class _Sampling(_Strict):
    model: Optional[str] = None  # optional: one model is served
    max_tokens: Optional[int] = None
    # Sampling: a field left out takes the model's generation_config.json value (greedy
    # when the model does not ask for sampling), then the neutral one (decode/sampling.py)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    # not OpenAI's, but sent by clients of vLLM, llama-server, TabbyAPI and LMDeploy:
    top_k: Optional[int] = Field(None, ge=-1)  # 0 or -1 (vLLM's "off"): every token
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    repetition_penalty: Optional[float] = Field(None, gt=0.0, le=10.0)
    seed: Optional[int] = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: Union[str, List[str], None] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    # subtracted from the logits of tokens already generated: once, and per occurrence
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    user: Optional[str] = None  # an end-user id for the caller's own records; unused here
    response_format: Optional[ResponseFormat] = None  # JSON enforced while decoding
    # Not OpenAI's: prompt-lookup speculation for this request (server default: --speculate).
    # It applies while the request decodes alone; batched rows decode one token a pass.
    speculate: Optional[Literal["off", "lookup"]] = None

    def stop_list(self) -> List[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ApiError(400, f"stop takes at most {MAX_STOP_STRINGS} strings, "
                                f"got {len(stops)}", param="stop")
        return stops

    def requested_max_tokens(self) -> Optional[int]:
        if self.response_format is not None:
            self.response_format.check()
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ApiError(400, f"max_tokens must be at least 1, got {self.max_tokens}",
                           param="max_tokens")
        if self.n != 1:
            raise ApiError(400, f"this server returns one choice per request; n must be 1, "
                                f"got {self.n}", param="n")
        return self.max_tokens

    def sampling_params(self, max_tokens: int, defaults: SamplingSettings) -> SamplingParams:
        """The request's parameters over the model's defaults (its generation config)."""
        settings = resolve(defaults, temperature=self.temperature, top_p=self.top_p,
                           top_k=0 if self.top_k == -1 else self.top_k, min_p=self.min_p,
                           repetition_penalty=self.repetition_penalty,
                           presence_penalty=self.presence_penalty,
                           frequency_penalty=self.frequency_penalty)
        return SamplingParams(max_tokens=max_tokens, seed=self.seed, stop=self.stop_list(),
                              logprobs=self.logprobs_wanted(), speculate=self.speculate,
                              **settings.as_dict())

    def logprobs_wanted(self) -> Optional[int]:
        """How many alternatives to report per token; None: no logprobs at all."""
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Sampling):
    messages: List[ChatMessage]
    max_completion_tokens: Optional[int] = None  # the newer name of max_tokens
    logprobs: bool = False  # report each generated token's log probability
    tools: Optional[List[Tool]] = None  # functions the model may call
    # auto: the model decides; none: tools are not shown; required / a named function:
    # the reply is forced (constrained decoding) to be one such call
    tool_choice: Union[Literal["auto", "none", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[bool] = None  # accepted: every call in a reply is parsed

    def active_tools(self) -> Optional[list]:
        """The tools to render, or None (no tools, or tool_choice none)."""
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ApiError(400, "tool_choice needs tools", param="tool_choice")
        return self.tools if self.tools and self.tool_choice != "none" else None

    def forced_call(self) -> bool:
        return self.active_tools() is not None and self.tool_choice not in (None, "auto")
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # and its rivals

    def logprobs_wanted(self) -> Optional[int]:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> Optional[int]:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        if not self.messages:
            raise ApiError(400, "messages must hold at least one message", param="messages")
        return super().requested_max_tokens()


class CompletionRequest(_Sampling):
    prompt: Union[str, List[str]]
    logprobs: Optional[int] = Field(None, ge=0, le=5)  # the legacy API: alternatives per token

    def logprobs_wanted(self) -> Optional[int]:
        return self.logprobs

    def prompt_text(self) -> str:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ApiError(400, "this server takes one prompt per request (a string or a list "
                                f"of one string), got {len(self.prompt)}", param="prompt")
        text = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        if not text:
            raise ApiError(400, "prompt is empty; give some text to continue", param="prompt")
        return text


def parse_body(raw: bytes, model_class):
    """Validate a raw JSON body; any problem becomes a 400 naming the field at fault."""
    try:
        return model_class.model_validate_json(raw or b"")
    except ValidationError as exc:
        _refuse_unsupported(exc.errors())
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            reason = first["msg"].removeprefix("Invalid JSON: ")
            raise ApiError(400, f"the request body is not valid JSON: {reason}",
                           code="invalid_json") from None
        where = ".".join(str(part) for part in _field_path(exc.errors()))
        message = f"{where}: {first['msg']}" if where else f"request body: {first['msg']}"
        raise ApiError(400, message, param=where or None) from None


def _refuse_unsupported(errors: list) -> None:
    """Fields this server does not implement get one 400 naming all of them."""
    extra = [".".join(str(part) for part in error["loc"]) for error in errors
             if error["type"] == "extra_forbidden"]
    if extra:
        raise ApiError(400, f"unsupported parameter{'s' if len(extra) > 1 else ''}: "
                            f"{', '.join(extra)}; this server does not implement "
                            f"{'them' if len(extra) > 1 else 'it'}, remove "
                            f"{'them' if len(extra) > 1 else 'it'} from the request "
                            "(docs/serving.md lists what is supported)",
                       param=extra[0], code="unsupported_parameter")


def _field_path(errors: list) -> tuple:
    """The field at fault. A union field reports one error per member, each with the
    member's type appended to the path (content.str, content.list[TextPart]): keep the
    part the first error's siblings share."""
    path = tuple(errors[0]["loc"])
    for error in errors[1:]:
        loc = tuple(error["loc"])
        if loc[:1] != path[:1]:
            continue
        shared = 0
        while shared < min(len(loc), len(path)) and loc[shared] == path[shared]:
            shared += 1
        path = path[:shared]
    return path
