"""The JSON shapes of OpenAI's responses and stream chunks, for chat and text completions."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import List, Optional

from .tools import parse_tool_calls


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(payload) -> str:
    """One server-sent event carrying ``payload`` (a dict, or the literal [DONE])."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


@dataclass
class Reply:
    """One response being built: its id, model and kind (chat or text completion)."""

    model: str
    chat: bool
    id: str = ""
    created: int = 0
    logprobs: bool = False  # the request asked for logprobs: report them, else null
    tools: bool = False  # tools were offered: parse the reply for tool calls
    _text_offset: int = 0  # completions' text_offset of the next token reported

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = self.created or int(time.time())

    def _logprobs(self, items: List[dict]) -> Optional[dict]:
        """Chat's {"content": [...]}, or the completions API's legacy parallel lists."""
        if not self.logprobs:
            return None
        if self.chat:
            return {"content": items}
        offsets = []
        for item in items:  # offsets into the completion text, counted from its start
            offsets.append(self._text_offset)
            self._text_offset += len(item["token"])
        return {"tokens": [item["token"] for item in items],
                "token_logprobs": [item["logprob"] for item in items],
                "top_logprobs": [{top["token"]: top["logprob"] for top in item["top_logprobs"]}
                                 for item in items],
                "text_offset": offsets}

    def _envelope(self, obj: str, choices: list) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices}

    def whole(self, text: str, finish_reason: str, prompt_tokens: int,
              completion_tokens: int, logprobs: Optional[List[dict]] = None) -> dict:
        """A non-streamed response."""
        logprobs = self._logprobs(logprobs or [])
        if self.chat:
            message = {"role": "assistant", "content": text}
            calls = []
            if self.tools:
                message["content"], calls = parse_tool_calls(text)
            if calls:
                message["tool_calls"] = calls
                finish_reason = "tool_calls"
            choice = {"index": 0, "message": message,
                      "logprobs": logprobs, "finish_reason": finish_reason}
            body = self._envelope("chat.completion", [choice])
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs,
                      "finish_reason": finish_reason}
            body = self._envelope("text_completion", [choice])
        body["usage"] = usage(prompt_tokens, completion_tokens)
        return body

    def chunk(self, text: Optional[str], finish_reason: Optional[str] = None,
              first: bool = False, logprobs: Optional[List[dict]] = None,
              tool_calls: Optional[List[dict]] = None) -> dict:
        """A stream chunk; for chat the first one carries the role."""
        logprobs = self._logprobs(logprobs) if logprobs else None
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            if tool_calls:
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(tool_calls)]
            choice = {"index": 0, "delta": delta, "logprobs": logprobs,
                      "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": text or "", "logprobs": logprobs,
                  "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        """The last chunk when the client asked for stream_options.include_usage."""
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        body["usage"] = usage(prompt_tokens, completion_tokens)
        return body
