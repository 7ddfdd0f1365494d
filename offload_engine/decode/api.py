"""The engine users hold: the runtime's loaded model plus text generation.

``offload_engine.load`` returns this class; the runtime below it knows nothing of
prompts, sampling or streaming.
"""

from __future__ import annotations

from typing import Optional

from ..runtime import engine as runtime_engine
from ..runtime.config import EngineConfig
from .generate import GenerationResult, generate


class Engine(runtime_engine.Engine):
    """A loaded model that generates text; ``.model`` is a stock transformers model."""

    def generate(self, prompt=None, **kwargs) -> GenerationResult:
        """Generate from a prompt string or chat ``messages=[...]``; see decode.generate."""
        return generate(self, prompt, **kwargs)


def load(path, config: Optional[EngineConfig] = None, **overrides) -> Engine:
    """Load a quantized directory for generation (see ``runtime.engine.load`` for flags)."""
    return runtime_engine.load(path, config, engine_class=Engine, **overrides)
