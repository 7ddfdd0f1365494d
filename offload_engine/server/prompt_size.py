"""Prompts too long for the context are refused before they are tokenized whole.

A body under --max-body-size can hold megabytes of text: tokenized whole it costs seconds
of CPU and hundreds of MiB per request, only to be refused by the context check after.
Here a long prompt is counted in chunks, cut where a word ends, and counting stops as soon
as the chunks hold more tokens than the context: the work is bounded by the context, not
by the body. A prompt that fits is then tokenized as usual.
"""

from __future__ import annotations

from typing import List

from .schemas import ApiError

CHARS_PER_CHUNK_TOKEN = 4  # chunk size: this many characters per context token
# a cut where a word ends can still split a pre-token (a punctuation run with its newline):
# each cut may count this many tokens more than the whole text has there
CUT_SLACK_TOKENS = 2
CUT_SEARCH_CHARS = 256  # how far back from the chunk end to look for a word end


def _cut(text: str, start: int, end: int) -> int:
    """Where to end a chunk near ``end``: before a space that follows a non-space, so the
    tokenizer's pre-tokens on both sides match those of the whole text."""
    if end >= len(text):
        return len(text)
    for i in range(end, max(end - CUT_SEARCH_CHARS, start + 1), -1):
        if text[i].isspace() and not text[i - 1].isspace():
            return i
    return end


def tokens_beyond(tokenizer, text: str, context: int) -> int:
    """A lower bound on the tokens of ``text`` once it exceeds ``context``; 0 when the text
    may fit (short texts are not tokenized here at all)."""
    chunk = context * CHARS_PER_CHUNK_TOKEN
    if len(text) <= chunk:
        return 0
    counted, cuts, start = 0, 0, 0
    while start < len(text):
        end = _cut(text, start, start + chunk)
        counted += len(tokenizer(text[start:end], add_special_tokens=False)["input_ids"])
        cuts += end < len(text)
        if counted - cuts * CUT_SLACK_TOKENS > context:
            return counted - cuts * CUT_SLACK_TOKENS
        start = end
    return 0


def refuse_overlong(tokenizer, texts: List[str], context: int, param: str) -> None:
    """400 context_length_exceeded when ``texts`` (a prompt, or a chat's message contents)
    hold more tokens than ``context``, found without tokenizing them whole."""
    text = "\n".join(texts)
    at_least = tokens_beyond(tokenizer, text, context)
    if at_least:
        raise ApiError(400, f"the prompt ({len(text)} characters, at least {at_least} tokens) "
                            f"exceeds this model's context of {context} tokens; shorten it",
                       param=param, code="context_length_exceeded")
