"""Speculative decoding on top of transformers' assisted generation, with honest counters.

Both proposers are transformers' own: ``--speculate lookup`` is its prompt-lookup
candidate generator (``prompt_lookup_num_tokens``, ``max_matching_ngram_size``) and
``--speculate draft`` its assisted generation with ``assistant_model``. Its verify step
keeps greedy output identical (tokens are accepted while they equal the target's argmax)
and, when sampling, draws every kept token from the target's distribution (prompt lookup:
each position is sampled from the target and kept while it equals the proposal; a draft
model: the speculative sampling rule of Leviathan et al.). We only choose the settings
and count what happened: transformers reports no proposal counts, so a forward pre-hook
on the target counts its passes and the tokens each one scored.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from ..errors import ConfigError
from ..planning.speculation import SPECULATE_MODES, check_speculation


@dataclass
class Speculation:
    """What one generate call speculates with."""

    mode: str  # "off", "lookup" or "draft"
    tokens: int  # K: proposals per verify pass (at most; lookup proposes 0 when no match)
    ngram: int  # longest n-gram lookup matches

    def label(self) -> str:
        if self.mode == "lookup":
            return f"lookup K={self.tokens} n={self.ngram}"
        if self.mode == "draft":
            return f"draft K={self.tokens}"
        return "off"


def resolve(engine, speculate: Optional[str], tokens: Optional[int]) -> Speculation:
    """The call's settings: arguments given here override the engine config's."""
    config = engine.config
    mode = config.speculate if speculate is None else speculate
    if mode is None or mode is False:
        mode = "off"
    count = config.speculate_tokens if tokens is None else tokens
    if mode == "draft" and getattr(engine, "draft", None) is None:
        raise ConfigError("speculate='draft' needs a draft model loaded with the engine: "
                          "load(..., draft_model=DIR) or --draft-model DIR")
    check_speculation(mode, count, config.lookup_ngram, config.draft_model)
    return Speculation(mode, count, config.lookup_ngram)


def generate_kwargs(engine, speculation: Speculation) -> dict:
    """The arguments that switch transformers' generate to assisted decoding."""
    if speculation.mode == "lookup":
        return {"prompt_lookup_num_tokens": speculation.tokens,
                "max_matching_ngram_size": speculation.ngram}
    if speculation.mode == "draft":
        draft_config = engine.draft.model.generation_config
        # The assistant reads these from its own generation config, not from generate's
        # arguments. A constant K, and no confidence cut-off: when the target streams, its
        # passes are what cost, so the resident draft may as well propose all K.
        draft_config.num_assistant_tokens = speculation.tokens
        draft_config.num_assistant_tokens_schedule = "constant"
        draft_config.assistant_confidence_threshold = 0.0
        return {"assistant_model": engine.draft.model}
    return {}


@dataclass
class PassCount:
    """Forward passes of the target model and the tokens they scored."""

    prompt_tokens: int
    passes: int = 0
    scored_tokens: int = 0  # input positions over all passes, the prompt included

    @property
    def proposed(self) -> int:
        """Proposals verified: every pass scores 1 new position plus its proposals; the
        first also scores the prompt."""
        if not self.passes:
            return 0
        return self.scored_tokens - self.prompt_tokens - (self.passes - 1)


@contextmanager
def count_passes(model, prompt_tokens: int) -> Iterator[PassCount]:
    """Count the target's forward calls while the block runs (the hook is then removed)."""
    count = PassCount(prompt_tokens)

    def hook(_module, args, kwargs):
        if torch.compiler.is_compiling():  # a traced counter would recompile every step:
            return  # compiled steps (--compile, never speculative) are counted by the caller
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"]
        count.passes += 1
        count.scored_tokens += int(ids.shape[1])

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield count
    finally:
        handle.remove()


def speculation_fields(speculation: Speculation, count: PassCount, new_tokens: int,
                       h2d_bytes: int, draft_passes: int) -> dict:
    """The GenerationStats fields that speculation adds (also filled when it is off)."""
    accepted = max(new_tokens - count.passes, 0) if speculation.mode != "off" else 0
    proposed = count.proposed if speculation.mode != "off" else 0
    return dict(
        speculate=speculation.label(),
        tokens_per_pass=new_tokens / count.passes if count.passes else 0.0,
        proposed_tokens=proposed, accepted_tokens=accepted,
        acceptance_rate=accepted / proposed if proposed else 0.0,
        h2d_bytes_per_generated_token=h2d_bytes / new_tokens if new_tokens else 0.0,
        draft_forward_passes=draft_passes,
    )


__all__ = ["SPECULATE_MODES", "Speculation", "PassCount", "count_passes", "generate_kwargs",
           "resolve", "speculation_fields"]
