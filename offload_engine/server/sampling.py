"""A request's sampling parameters and its logprobs; the sampling itself, and the text a
request has produced so far (stop strings included), are decode/sampling.py's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from ..decode.sampling import Sampler, SamplingSettings, TextTracker

__all__ = ["SamplingParams", "TextTracker", "describe_logprobs", "token_logprobs"]


@dataclass
class SamplingParams:
    """What one request asked for, the model's defaults filled in; validated by the HTTP
    layer before it gets here (the sampling fields again by ``settings``)."""

    max_tokens: int  # new tokens at most; finish_reason "length" when reached
    temperature: float = 1.0  # 0 means greedy (always the likeliest token)
    top_p: float = 1.0  # nucleus: sample from the smallest set holding this much probability
    seed: Optional[int] = None  # seeds this request's own generator; None draws a fresh seed
    stop: List[str] = field(default_factory=list)  # finish when the text contains one
    presence_penalty: float = 0.0  # subtracted once from the logit of every token generated
    frequency_penalty: float = 0.0  # subtracted per time a token was generated
    logprobs: Optional[int] = None  # alternatives to report per token; None: no logprobs
    speculate: Optional[str] = None  # "lookup" or "off" for this request; None: server's
    top_k: int = 0  # keep the k likeliest tokens; 0 keeps all
    min_p: float = 0.0  # drop tokens below min_p x the likeliest one's probability
    repetition_penalty: float = 1.0  # logits of tokens in the prompt or reply / by this

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def settings(self) -> SamplingSettings:
        return SamplingSettings(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty)

    def sampler(self, prompt_ids: List[int], device: torch.device) -> Sampler:
        """The request's own sampler: transformers' processors and its own generator."""
        return Sampler(self.settings, prompt_ids, self.seed, device)


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
