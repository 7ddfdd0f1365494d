"""How much of the model's context a conversation may use, and fitting a chat into it.

``--ctx-size`` (llama.cpp's ``-c``) caps the tokens a prompt plus its reply may take;
without it the model's own limit applies. ``chat`` drops the oldest turns when the
history outgrows that budget instead of failing.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from ..errors import ConfigError, ContextLengthError
from .generate import encode_prompt


def context_limit(engine, ctx_size: Optional[int] = None) -> Optional[int]:
    """Tokens a prompt plus reply may take: the smaller of --ctx-size and the model's limit."""
    model_limit = getattr(engine.model.config, "max_position_embeddings", None)
    if ctx_size is None:
        return model_limit
    if ctx_size < 1:
        raise ConfigError(f"--ctx-size must be at least 1, got {ctx_size}")
    return ctx_size if model_limit is None else min(ctx_size, model_limit)


def check_prompt_fits(engine, prompt: str, chat: bool, max_new_tokens: int,
                      ctx_size: Optional[int]) -> None:
    """Raise ContextLengthError when the prompt plus --max-new-tokens exceeds --ctx-size."""
    limit = context_limit(engine, ctx_size)
    if ctx_size is None or limit is None:
        return  # generate() checks the model's own limit
    used = encode_prompt(engine, prompt, None, chat).shape[1]
    if used + max_new_tokens > limit:
        where = (f"--ctx-size {limit}; shorten the prompt, lower -n or raise -c"
                 if limit == ctx_size else
                 f"this model's context of {limit} tokens (-c {ctx_size} is more than the "
                 "model allows); shorten the prompt or lower -n")
        raise ContextLengthError(
            f"the prompt ({used} tokens) plus --max-new-tokens {max_new_tokens} exceeds "
            f"{where}")


def fit_history(engine, messages: List[dict], max_new_tokens: int,
                limit: Optional[int]) -> Tuple[List[dict], int]:
    """(messages that fit, turns dropped): the oldest turns go first; a system message stays.

    A turn is one message. When even the newest message alone does not fit, the
    ContextLengthError says so (the caller keeps the history without it).
    """
    if limit is None:
        return messages, 0
    system = [m for m in messages[:1] if m.get("role") == "system"]
    turns = messages[len(system):]
    dropped = 0
    while turns:
        candidate = system + turns
        if encode_prompt(engine, None, candidate, True).shape[1] + max_new_tokens <= limit:
            return candidate, dropped
        turns = turns[1:]
        dropped += 1
        # A reply without the message it answers confuses most chat templates.
        while turns and turns[0].get("role") == "assistant":
            turns, dropped = turns[1:], dropped + 1
    raise ContextLengthError(
        f"this message plus -n {max_new_tokens} reply tokens does not fit the context of "
        f"{limit} tokens even alone; send a shorter message, lower -n or raise -c")
