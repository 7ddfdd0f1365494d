"""The draft model of ``--speculate draft``: loaded whole onto the device beside the target.

The draft proposes tokens every pass, so streaming it would cost the very copies that
speculation saves: it is loaded with an unbounded budget (every weight resident), and the
device bytes it takes are subtracted from the target's weight budget, so that
``--gpu-budget`` still bounds every weight byte on the device. A draft with another
tokenizer is refused: transformers could translate between tokenizers (universal
assisted decoding), but that re-tokenizes text every pass and its greedy output is not
guaranteed identical, which this engine promises. A draft with the same tokenizer and a
smaller padded vocabulary has its logits padded to the target's.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import ConfigError
from ..runtime import engine as runtime_engine
from ..runtime.config import EngineConfig
from ..units import format_bytes

logger = logging.getLogger(__name__)


def load_with_draft(path, config: EngineConfig, engine_class: type):
    """Load the draft, check it against the target, then the target in what budget is left."""
    directory = Path(path)
    draft = runtime_engine.load(config.draft_model, draft_config(config))
    try:
        check_same_vocabulary(directory, Path(config.draft_model), draft)
        draft_bytes = device_bytes(draft)
        target_config = target_config_after_draft(config, directory, draft_bytes)
        engine = runtime_engine.load(directory, target_config, engine_class=engine_class)
    except BaseException:
        draft.close()
        raise
    engine.attach_draft(draft, draft_bytes)
    logger.info("draft model %s: %s resident on %s", config.draft_model,
                format_bytes(draft_bytes), engine.device)
    return engine


def draft_config(config: EngineConfig) -> EngineConfig:
    """The target's device, dtype and format; every weight resident; no speculation of its own."""
    return replace(config, gpu_budget="unbounded", cache_entries=None, hw_profile=None,
                   policy="static", embeddings="device", speculate="off", draft_model=None)


def device_bytes(engine) -> int:
    """Bytes the engine keeps on its device: the weight arena plus dense tensors."""
    dense = {id(t): t.numel() * t.element_size()
             for t in list(engine.model.parameters()) + list(engine.model.buffers())
             if t.device == engine.device}
    return engine.plan.arena_bytes + sum(dense.values())


def check_same_vocabulary(target_dir: Path, draft_dir: Path, draft) -> None:
    """Refuse a draft with another tokenizer; pad a same-tokenizer draft's smaller vocabulary."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    if tokenizer.get_vocab() != draft.tokenizer.get_vocab():
        raise ConfigError(
            f"--draft-model {draft_dir}: its tokenizer maps tokens differently from the "
            f"target {target_dir}'s; use a draft with the same tokenizer (the same model "
            "family), or --speculate lookup, which needs no draft")
    target_rows = AutoConfig.from_pretrained(target_dir).get_text_config().vocab_size
    draft_rows = draft.model.config.get_text_config().vocab_size
    if draft_rows == target_rows:
        return
    if not len(tokenizer) <= draft_rows < target_rows:
        raise ConfigError(
            f"--draft-model {draft_dir}: its vocabulary has {draft_rows} tokens, the target "
            f"{target_dir} has {target_rows} and the tokenizer {len(tokenizer)}; a draft "
            "needs at least the tokenizer's and at most the target's: use a draft of the same "
            "model family, or --speculate lookup")
    pad_logits(draft.model, target_rows)


def pad_logits(model, rows: int) -> None:
    """Make a draft's logits as wide as the target's, the extra rows never chosen.

    Models of one family share a tokenizer but pad their embeddings differently
    (Qwen2.5-0.5B: 151936 rows, Qwen2.5-32B: 152064). transformers compares the
    configs' vocab_size to tell a same-tokenizer draft from a different-tokenizer one, and
    speculative sampling compares the two distributions position by position, so the
    draft's logits get -inf columns up to the target's size (probability 0: never proposed)
    and its config states that size.
    """
    embedded = model.config.get_text_config().vocab_size

    def clamp(_module, args, kwargs):
        # A token the draft cannot embed (a padding row the target should never pick) is
        # shown to it as token 0: its next proposals are then likely rejected, never wrong.
        ids = kwargs.get("input_ids")
        if ids is not None and bool((ids >= embedded).any()):
            kwargs["input_ids"] = ids.masked_fill(ids >= embedded, 0)
        return args, kwargs

    def pad(_module, _args, output):
        extra = rows - output.logits.shape[-1]
        if extra > 0:
            output.logits = torch.nn.functional.pad(output.logits, (0, extra),
                                                    value=float("-inf"))
        return output

    model.register_forward_pre_hook(clamp, with_kwargs=True)
    model.register_forward_hook(pad)
    model.config.get_text_config().vocab_size = rows


def target_config_after_draft(config: EngineConfig, directory: Path,
                              draft_bytes: int) -> EngineConfig:
    """The target's config with the draft's bytes taken out of its weight budget."""
    if config.cache_entries is not None:
        raise ConfigError("--cache-entries cannot count the draft model's memory: give "
                          "--gpu-budget (bytes) with --draft-model")
    budget = runtime_engine.weight_budget(config, directory)
    if budget is None:  # unbounded: the draft sits beside every weight
        return config
    left, minimum = budget - draft_bytes, target_minimum(config, directory)
    if left < minimum:
        raise ConfigError(
            f"--draft-model {config.draft_model} takes {format_bytes(draft_bytes)} of the "
            f"{format_bytes(budget)} weight budget, leaving {format_bytes(max(left, 0))} for "
            f"{directory}, below its minimum of {format_bytes(minimum)}: raise --gpu-budget "
            f"to at least {format_bytes(minimum + draft_bytes)}, or use a smaller draft")
    return replace(config, gpu_budget=left, hw_profile=None)


def target_minimum(config: EngineConfig, directory: Path) -> int:
    """The smallest arena the target accepts, sized by the planner as the runtime would."""
    from ..planning.planner import cache_entries, describe_model
    from ..planning.policy import plan_cache

    shape = describe_model(directory)
    entries = cache_entries(shape, config.resolved_cache_format(shape.spec), config.torch_dtype())
    return plan_cache(entries, None, config.policy, config.prefetch_depth).minimum_budget
