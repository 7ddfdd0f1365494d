"""Per-request sampling and the text a request has produced so far (stop strings included)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch


@dataclass
class SamplingParams:
    """What one request asked for; validated by the HTTP layer before it gets here."""

    max_tokens: int  # new tokens at most; finish_reason "length" when reached
    temperature: float = 1.0  # 0 means greedy (always the likeliest token)
    top_p: float = 1.0  # nucleus: sample from the smallest set holding this much probability
    seed: Optional[int] = None  # seeds this request's own generator; None draws a fresh seed
    stop: List[str] = field(default_factory=list)  # finish when the text contains one
    presence_penalty: float = 0.0  # subtracted once from the logit of every token generated
    frequency_penalty: float = 0.0  # subtracted per time a token was generated
    logprobs: Optional[int] = None  # alternatives to report per token; None: no logprobs
    speculate: Optional[str] = None  # "lookup" or "off" for this request; None: server's

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(params: SamplingParams, device: torch.device) -> Optional[torch.Generator]:
    """A generator per request, so batching with others never changes a seeded result."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def penalize(logits: torch.Tensor, generated: List[int],
             params: SamplingParams) -> torch.Tensor:
    """OpenAI's presence and frequency penalties over the tokens this request generated
    (as vLLM does; the prompt is not counted). One row of logits (V,) in, a new one out."""
    if not generated or not (params.presence_penalty or params.frequency_penalty):
        return logits
    ids = torch.tensor(generated, device=logits.device)
    counts = torch.bincount(ids, minlength=logits.shape[-1])[:logits.shape[-1]].to(logits.dtype)
    return logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)


def token_logprobs(logits: torch.Tensor, token: int, alternatives: int) -> Tuple[float, list]:
    """The chosen token's log probability under the model (the raw logits: before
    temperature, top-p and penalties, as vLLM reports them) and the ``alternatives``
    likeliest tokens as (id, logprob) pairs."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = []
    if alternatives:
        values, ids = torch.topk(logprobs, alternatives)
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return float(logprobs[token]), top


def describe_logprobs(tokenizer, entries: list) -> List[dict]:
    """(token, logprob, alternatives) entries as OpenAI's chat logprobs content items.

    A token's text is its own decoding; a token that is part of a multi-byte character
    decodes to U+FFFD, and its ``bytes`` are those of that text, not the raw piece."""
    def item(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return [{**item(token, logprob), "top_logprobs": [item(i, lp) for i, lp in top]}
            for token, logprob, top in entries]


def sample_token(logits: torch.Tensor, params: SamplingParams,
                 generator: Optional[torch.Generator]) -> int:
    """Pick the next token from one row of logits (V,)."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass ahead of each token
        # the likeliest token always stays (before == 0): a top_p below float32's smallest
        # number (1e-300) would otherwise mask every token
        sorted_probs = sorted_probs.masked_fill((before >= params.top_p) & (before > 0), 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _held_back(text: str, stops: List[str]) -> int:
    """Characters at the end of ``text`` that could be the start of a stop string."""
    held = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:size]):
                held = size
                break
    return held


class TextTracker:
    """Decodes a request's tokens and hands out only text that is final.

    Text is held back while it ends in an incomplete UTF-8 character or could be the start
    of a stop string; a stop string that appears ends the request and is not returned.
    """

    def __init__(self, tokenizer, stops: List[str]):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.emitted = ""  # text already handed out

    def update(self, token_ids: List[int], final: bool) -> Tuple[str, bool]:
        """The new text to hand out, and whether a stop string was found."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            return self._hand_out(text[:cut]), True
        if not final:
            if text.endswith("\ufffd"):
                return "", False
            text = text[:len(text) - _held_back(text, self.stops)]
        return self._hand_out(text), False

    def _hand_out(self, text: str) -> str:
        if not text.startswith(self.emitted):
            # a later token changed how earlier ones decode; keep what was already sent
            text = self.emitted + text[len(self.emitted):]
        delta = text[len(self.emitted):]
        self.emitted = text
        return delta
