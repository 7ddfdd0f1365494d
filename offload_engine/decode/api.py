"""The engine users hold: the runtime's loaded model plus text generation.

``offload_engine.load`` returns this class; the runtime below it knows nothing of
prompts, sampling, streaming or speculation.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

from ..runtime import engine as runtime_engine
from ..runtime.config import EngineConfig
from .generate import GenerationResult, generate  # noqa: F401 (GenerationResult re-exported)
from .stream import TextStream


class Engine(runtime_engine.Engine):
    """A loaded model that generates text; ``.model`` is a stock transformers model."""

    draft = None  # the draft model's runtime Engine under --speculate draft, else None
    draft_bytes = 0  # device bytes the draft takes out of the weight budget

    def generate(self, prompt=None, *, stream: bool = False, **kwargs):
        """Generate from a prompt string or chat ``messages=[...]``; see decode.generate.

        Returns a GenerationResult, or with ``stream=True`` a TextStream: iterate it for
        the text pieces as they come; its ``result`` is the GenerationResult afterwards."""
        if stream:
            return TextStream(self, prompt, kwargs)
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
    """Load a model for generation (see ``runtime.engine.load`` for flags).

    ``path`` is a quantized directory, or (converted once into the engine's cache, then
    reused: checkpoint/autoconvert.py) a .gguf file or a Hugging Face checkpoint given as
    a directory, an id in the local HF cache (``ORG/NAME``) or a ``models--ORG--NAME``
    cache folder; ``~`` is expanded. With ``draft_model=DIR`` the draft is loaded first,
    whole, and its device bytes are taken out of the weight budget (decode/draft.py).
    """
    from ..checkpoint.autoconvert import ConversionSettings, ensure_converted
    from ..checkpoint.calibrate import CalibrationSettings
    from ..checkpoint.methods import AUTO_METHOD, MethodSettings

    config = replace(config or EngineConfig(), **overrides)
    calibration = CalibrationSettings(device=config.torch_device().type)  # auto: GPU -> awq
    path = ensure_converted(path, ConversionSettings(method=MethodSettings(
        AUTO_METHOD, calibration=calibration)), progress=config.progress)
    if config.draft_model is not None:
        from .draft import load_with_draft

        return load_with_draft(path, config, engine_class=Engine)
    return runtime_engine.load(path, config, engine_class=Engine)
