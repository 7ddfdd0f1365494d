"""Tool calls: tools go into the model's own chat template; its calls are parsed back out.

Two output styles are read, the ones the templates we serve ask for:
- Hermes (Qwen2.5 and others): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  any number of them, with optional text around;
- Llama 3.x: the whole reply is one JSON object ``{"name": ..., "parameters": {...}}``.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import List, Optional, Tuple

from .schemas import ApiError

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
_HERMES = re.compile(re.escape(HERMES_OPEN) + r"\s*(.*?)\s*" + re.escape(HERMES_CLOSE), re.S)


def check_template(tokenizer) -> str:
    """The call style this model's template asks for; 400 when it cannot render tools."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if not isinstance(template, str) or "tools" not in template:
        raise ApiError(400, "this model's chat template does not render tools, so it was not "
                            "trained to call them; send the request without tools",
                       param="tools", code="tools_unsupported")
    return "hermes" if HERMES_OPEN in template else "llama"


def template_message(message: dict, tool_calls: Optional[list]) -> dict:
    """An assistant message's tool_calls as templates expect them: arguments as a dict."""
    calls = []
    for call in tool_calls or []:
        try:
            arguments = json.loads(call.function.arguments)
        except ValueError:
            arguments = call.function.arguments
        calls.append({"id": call.id, "type": "function",
                      "function": {"name": call.function.name, "arguments": arguments}})
    if calls:
        message["tool_calls"] = calls
    return message


def _call(name: str, arguments) -> dict:
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _as_call(payload: str) -> Optional[dict]:
    try:
        data = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    return _call(data["name"], arguments)


def parse_tool_calls(text: str) -> Tuple[Optional[str], List[dict]]:
    """(content left over or None, OpenAI tool_calls) from a finished reply."""
    calls = [_as_call(match) for match in _HERMES.findall(text)]
    if calls and all(calls):
        content = _HERMES.sub("", text).strip()
        return content or None, calls
    whole = _as_call(text.strip()) if text.strip().startswith("{") else None
    if whole is not None:
        return None, [whole]
    return text, []


def may_be_tool_call(text: str) -> bool:
    """Whether a reply that begins with ``text`` could be a tool call (so stream nothing yet)."""
    start = text.lstrip()
    return HERMES_OPEN.startswith(start) or start.startswith(HERMES_OPEN) or \
        start.startswith("{")


def forced_call_schema(tools: list, choice, style: str) -> dict:
    """The JSON a forced call must match: one of the tools (tool_choice "required"), or the
    named one, with its parameters schema."""
    key = "arguments" if style == "hermes" else "parameters"
    named = choice.function.name if not isinstance(choice, str) else None
    options = [{"type": "object", "properties": {
        "name": {"const": tool.function.name},
        key: tool.function.parameters or {"type": "object"}},
        "required": ["name", key]} for tool in tools
        if named is None or tool.function.name == named]
    if not options:
        raise ApiError(400, f"tool_choice names {named!r}, which is not among tools",
                       param="tool_choice")
    return options[0] if len(options) == 1 else {"anyOf": options}


class ToolStream:
    """Holds back streamed text while the reply may still turn out to be a tool call."""

    def __init__(self) -> None:
        self.held = ""  # text not sent yet
        self.held_logprobs: list = []
        self.streaming = False  # the reply is plain text: pass everything through

    def feed(self, text: str, logprobs: list) -> Tuple[str, list]:
        """What to send now of ``text`` (and its logprobs)."""
        if self.streaming:
            return text, logprobs
        self.held += text
        self.held_logprobs += logprobs
        if may_be_tool_call(self.held):
            return "", []
        self.streaming = True
        return self.flush()

    def flush(self) -> Tuple[str, list]:
        text, logprobs = self.held, self.held_logprobs
        self.held, self.held_logprobs = "", []
        return text, logprobs
