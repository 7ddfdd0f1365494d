"""The engine users hold: the runtime's loaded model plus text generation.

``offload_engine.load`` returns this class; the runtime below it knows nothing of
prompts, sampling, streaming or speculation.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

from ..runtime import engine as runtime_engine
from ..runtime.config import EngineConfig
from .generate import GenerationResult, generate


class Engine(runtime_engine.Engine):
    """A loaded model that generates text; ``.model`` is a stock transformers model."""

    draft = None  # the draft model's runtime Engine under --speculate draft, else None
    draft_bytes = 0  # device bytes the draft takes out of the weight budget

    def generate(self, prompt=None, **kwargs) -> GenerationResult:
        """Generate from a prompt string or chat ``messages=[...]``; see decode.generate."""
        return generate(self, prompt, **kwargs)

    def attach_draft(self, draft, draft_bytes: int) -> None:
        self.draft, self.draft_bytes = draft, draft_bytes

    @property
    def stats(self) -> dict:
        stats = super().stats
        if self.draft is not None:
            stats["draft_model"] = str(self.draft.directory)
            stats["draft_device_bytes"] = self.draft_bytes
        return stats

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.draft is not None:
                self.draft.close()


def load(path, config: Optional[EngineConfig] = None, **overrides) -> Engine:
    """Load a quantized directory for generation (see ``runtime.engine.load`` for flags).

    With ``draft_model=DIR`` the draft is loaded first, whole, and its device bytes are
    taken out of the weight budget (decode/draft.py).
    """
    config = replace(config or EngineConfig(), **overrides)
    if config.draft_model is not None:
        from .draft import load_with_draft

        return load_with_draft(path, config, engine_class=Engine)
    return runtime_engine.load(path, config, engine_class=Engine)
