"""Prompt-lookup speculation in the server, used only while ONE sequence is being decoded.

With several rows, one pass over the streamed weights already serves several tokens
(batching), and per-row proposals of different lengths would need ragged verify steps;
with one row, speculation is the only way to get more than one token per pass. So
``serve --speculate lookup`` (or a request's own ``"speculate": "lookup"``) changes the
decode step of a lone sequence and nothing else.

The proposer is transformers' own :class:`PromptLookupCandidateGenerator`. The verify
step is ours because the server drives the model itself (its left-padded batched cache,
its per-request generators) rather than through ``generate``: it feeds the last token and
the K proposals in one forward, then samples each position with the request's own sampler
and keeps proposals while they equal what was sampled. Every kept token is thus drawn from
the target's distribution, and greedy output equals plain decoding. The cache is then cut
back to the tokens kept.
"""

from __future__ import annotations

import logging

import torch
from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

from ..errors import ConfigError
from ..model.cache_arg import cache_kwargs

logger = logging.getLogger(__name__)


def check_server_speculation(engine_config) -> None:
    if engine_config.speculate == "draft":
        raise ConfigError("serve supports --speculate lookup only: a draft model would need a "
                          "KV cache of its own for every request; use --speculate lookup or off")


def applies(scheduler) -> bool:
    """Speculate this step? Only for a lone sequence that asked for lookup, by its own
    ``speculate`` field or, without one, by the server's --speculate."""
    if len(scheduler._active) != 1:
        return False
    asked = scheduler._active[0].params.speculate or scheduler.engine.config.speculate
    return asked == "lookup"


def propose(scheduler, sequence) -> list:
    """Up to K tokens that followed the latest n-gram earlier in the prompt or reply."""
    config = scheduler.engine.config
    room = sequence.params.max_tokens - len(sequence.token_ids) - 1  # the bonus token's place
    if room < 1:
        return []
    ids = torch.tensor([sequence.prompt_ids + sequence.token_ids])
    proposer = PromptLookupCandidateGenerator(
        num_output_tokens=min(config.speculate_tokens, room),
        max_matching_ngram_size=config.lookup_ngram, max_length=ids.shape[1] + room + 1,
        vocab_size=scheduler.engine.model.config.get_text_config().vocab_size)
    candidates, _ = proposer.get_candidates(ids)
    return candidates[0, ids.shape[1]:].tolist()


def lookup_step(scheduler) -> None:
    """One verify forward for the lone active sequence; it keeps 1 to K+1 tokens."""
    sequence, batch = scheduler._active[0], scheduler._batch
    candidates = propose(scheduler, sequence)
    tokens = [sequence.token_ids[-1]] + candidates
    past, device = batch.mask.shape[1], batch.mask.device
    positions = (batch.mask.sum(dim=1, keepdim=True)
                 + torch.arange(len(tokens), device=device))  # (1, T): after the real tokens
    new = torch.ones((1, len(tokens)), dtype=batch.mask.dtype, device=device)
    mask = torch.cat([batch.mask, new], dim=1)  # (1, past + T)
    try:
        output = scheduler.engine.model(
            input_ids=torch.tensor([tokens], device=device), attention_mask=mask,
            position_ids=positions, use_cache=True,
            **cache_kwargs(scheduler.engine.model, batch.cache),
            logits_to_keep=len(tokens))
    except Exception as exc:  # noqa: BLE001 - the request fails with the cause
        logger.exception("speculative decode step failed")
        scheduler._fail_active(f"decode step failed: {type(exc).__name__}: {exc}")
        return
    scheduler.metrics.record_batch(1)
    kept, finished = _verify(scheduler, sequence, output.logits[0], candidates)
    batch.cache.crop(kept - len(tokens))  # drop the columns of rejected proposals (<= 0)
    batch.mask = mask[:, :past + kept]
    scheduler.metrics.count("speculative_proposed", len(candidates))
    scheduler.metrics.count("speculative_accepted", kept - 1)
    if finished:
        scheduler._leave({0})


def _verify(scheduler, sequence, logits: torch.Tensor, candidates: list):
    """(positions kept, finished): sample position by position while proposals match."""
    for i in range(len(candidates) + 1):
        if scheduler._advance(sequence, logits[i]):
            return i + 1, True
        if i == len(candidates) or sequence.token_ids[-1] != candidates[i]:
            return i + 1, False
    raise AssertionError("unreachable: the last position always returns")
