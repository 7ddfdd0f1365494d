"""A request as the scheduler sees it, and the events it hands back to the HTTP side."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from .sampling import SamplingParams, TextTracker


@dataclass
class TextEvent:
    text: str  # new final text of the reply
    logprobs: list = field(default_factory=list)  # per token since the last event, if asked


@dataclass
class DoneEvent:
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    logprobs: list = field(default_factory=list)  # tokens not yet reported by a TextEvent


@dataclass
class ErrorEvent:
    message: str  # names the cause
    status: int = 500  # HTTP status the request should fail with


class Sequence:
    """One request: its prompt, what it asked for, and what it produced so far."""

    _ids = itertools.count()

    def __init__(self, prompt_ids: List[int], params: SamplingParams,
                 emit: Callable[[object], None], constraint=None):
        self.id = next(self._ids)
        self.prompt_ids = prompt_ids
        self.params = params
        self.emit = emit  # called from the scheduler thread with Text/Done/ErrorEvents
        self.token_ids: List[int] = []
        self.cancelled = False  # set by the HTTP side when the client went away
        self.sampler = None  # decode.sampling.Sampler: transformers' processors, own generator
        self.tracker: Optional[TextTracker] = None
        self.logprobs: list = []  # (token, logprob, alternatives) not yet handed out
        self.constraint = constraint  # constrain.Constraint for response_format, or None
