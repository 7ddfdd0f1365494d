"""The draft model of ``--speculate draft``: loaded whole onto the device beside the target.

The draft proposes tokens every pass, so streaming it would cost the very copies that
speculation saves: it is loaded with an unbounded budget (every weight resident), and the
device bytes it takes are subtracted from the target's weight budget, so that
``--gpu-budget`` still bounds every weight byte on the device. A draft with another
vocabulary is refused: transformers could translate between tokenizers (universal
assisted decoding), but that re-tokenizes text every pass and its greedy output is not
guaranteed identical, which this engine promises.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

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
    from transformers import AutoConfig, AutoTokenizer

    if AutoTokenizer.from_pretrained(target_dir).get_vocab() != draft.tokenizer.get_vocab():
        raise ConfigError(
            f"--draft-model {draft_dir}: its tokenizer maps tokens differently from the "
            f"target {target_dir}'s; use a draft with the same tokenizer (the same model "
            "family), or --speculate lookup, which needs no draft")
    target_rows = AutoConfig.from_pretrained(target_dir).get_text_config().vocab_size
    draft_rows = draft.model.config.get_text_config().vocab_size
    if target_rows != draft_rows:
        # Same tokenizer, embeddings padded to different sizes (Qwen2.5-0.5B has 151936
        # rows, Qwen2.5-32B 152064): transformers then needs its slower, approximate
        # different-tokenizer path, whose greedy output is not guaranteed identical.
        raise ConfigError(
            f"--draft-model {draft_dir}: its vocabulary has {draft_rows} tokens, the target "
            f"{target_dir} has {target_rows}; drafting needs equal vocabulary sizes: use a "
            "draft whose config.json has the target's vocab_size, or --speculate lookup")


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

    entries = cache_entries(describe_model(directory), config.resolved_cache_format(),
                            config.torch_dtype())
    return plan_cache(entries, None, config.policy, config.prefetch_depth).minimum_budget
