"""Speculative decoding settings and their PREDICTED effect on decode speed.

When weights stream over the host link, a forward pass costs about the same whether it
scores one token or K+1: every streamed weight is copied once per pass. Speculation
proposes K tokens cheaply (an n-gram lookup in the context, or a small draft model kept
resident on the device) and the target verifies them all in one pass.

The settings are checked here so that the engine config, the planner and the CLI share one
definition. The prediction is arithmetic on a :class:`~.planner.Prediction`, not a
measurement: with K proposal slots per pass of which a share A is accepted, a pass yields
``1 + A * K`` tokens. From a run's stats, A = (tokens per pass - 1) / K. For a draft model,
which fills every slot, that is about the stats line's acceptance (accepted / proposed);
prompt lookup proposes nothing when the context has no match, so its A is lower than its
acceptance (docs/performance.md shows both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError

SPECULATE_MODES = ("off", "lookup", "draft")
MAX_SPECULATE_TOKENS = 64  # beyond this a verify pass is no longer a cheap decode step


def check_speculation(mode: str, tokens: int, ngram: int, draft_model: Optional[str]) -> None:
    """Raise ConfigError naming the flag when the speculation settings do not hold together."""
    if mode not in SPECULATE_MODES:
        raise ConfigError(f"unknown --speculate {mode!r}: use {', '.join(SPECULATE_MODES)}")
    if not 1 <= tokens <= MAX_SPECULATE_TOKENS:
        raise ConfigError(f"--speculate-tokens must be in 1..{MAX_SPECULATE_TOKENS}, "
                          f"got {tokens}")
    if ngram < 1:
        raise ConfigError(f"--lookup-ngram must be at least 1, got {ngram}")
    if mode == "draft" and draft_model is None:
        raise ConfigError("--speculate draft needs --draft-model DIR (a quantized directory "
                          "of a small model with the same tokenizer)")


def tokens_per_pass(tokens: int, acceptance: float) -> float:
    """Tokens one verify pass yields when it checks ``tokens`` proposals (a PREDICTION)."""
    if not 0 <= acceptance <= 1:
        raise ConfigError(f"--acceptance must be in [0, 1], got {acceptance}")
    return 1 + acceptance * tokens


@dataclass
class SpeculationPrediction:
    """PREDICTION of decode with speculation (bandwidth model, not a measurement)."""

    speculate_tokens: int  # K: proposals verified per target pass
    acceptance: float  # share of the K proposal slots accepted: (tokens/pass - 1) / K
    tokens_per_pass: float  # 1 + acceptance x K
    target_pass_s: float  # one target step (the plan's step_s)
    draft_bytes: int  # draft model kept on the device (0 for lookup)
    draft_step_s: float  # one draft step: its bytes / device bandwidth
    pass_s: float  # target pass + K draft steps
    tokens_per_s: float  # tokens_per_pass / pass_s
    speedup: float  # over the plan's decode without speculation
    streamed_bytes_per_token: float  # the plan's streamed bytes per step / tokens_per_pass


def predict_speculation(step_s: float, streamed_bytes_per_step: float, tokens: int,
                        acceptance: float, device_bandwidth: float,
                        draft_bytes: int = 0) -> SpeculationPrediction:
    """Decode speed when each target step verifies ``tokens`` proposals.

    Assumes a verify pass of K+1 tokens costs one decode step (memory bound: the weights
    are read once, the extra compute is small against the weight traffic) and a draft
    step reads the draft's resident bytes once. Both assumptions fail when compute
    bound (large K on a fast card); the prediction says so by being labelled one.
    """
    per_pass = tokens_per_pass(tokens, acceptance)
    draft_step = draft_bytes / device_bandwidth if draft_bytes else 0.0
    pass_s = step_s + tokens * draft_step
    base = 1 / step_s if step_s else float("inf")
    speed = per_pass / pass_s if pass_s else float("inf")
    return SpeculationPrediction(
        speculate_tokens=tokens, acceptance=acceptance, tokens_per_pass=per_pass,
        target_pass_s=step_s, draft_bytes=draft_bytes, draft_step_s=draft_step,
        pass_s=pass_s, tokens_per_s=speed, speedup=speed / base if step_s else 1.0,
        streamed_bytes_per_token=streamed_bytes_per_step / per_pass,
    )


def draft_device_bytes(path, cache_format: str, dtype) -> int:
    """Device bytes of a draft model kept whole: every weight resident, plus its dense tensors.

    The same sizes the runtime's arena uses (decode/draft.py measures the loaded draft).
    """
    from .describe import describe_model
    from .planner import cache_entries
    from .policy import plan_cache

    shape = describe_model(path)
    weights = plan_cache(cache_entries(shape, cache_format, dtype), None).total_bytes
    return weights + (shape.embedding_elements + shape.other_dense_elements) * dtype.itemsize
