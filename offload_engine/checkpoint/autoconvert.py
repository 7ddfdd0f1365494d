"""Run a GGUF file or a Hugging Face checkpoint directly: convert it once into the
engine's cache directory, then reuse that conversion.

A conversion is keyed by the source (its resolved path, and the size and modification
time of the file, or of every file of the directory) and by the conversion settings, so
an edited or re-downloaded source, or other settings, convert again; anything else reuses
``$OFFLOAD_ENGINE_CACHE/converted/NAME-METHOD-SCHEME-gGROUP-KEY``. A cached directory that
no longer verifies is converted again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..errors import FormatError, InexactImportError
from ..quant.layout import QuantSpec
from ..quant.schemes import AUTO_METHOD, DEFAULT_GROUP_SIZE, DEFAULT_SCHEME
from .embedded import cache_root
from .format import MANIFEST_NAME, not_a_quantized_dir, verify_directory
from .methods import MethodSettings
from .model_ref import resolve_model_path

logger = logging.getLogger(__name__)
CONVERTED = "converted"  # the folder under cache_root() holding automatic conversions


@dataclass(frozen=True)
class ConversionSettings:
    """How a source given to run/chat/serve/load is converted (the `quantize` defaults)."""

    spec: QuantSpec = QuantSpec(DEFAULT_SCHEME, DEFAULT_GROUP_SIZE)
    method: MethodSettings = field(default_factory=lambda: MethodSettings(AUTO_METHOD))
    reconvert: bool = False  # convert again even when a cached conversion verifies

    def key(self) -> dict:
        data = self.method.calibration.data
        return {"scheme": self.spec.scheme, "group_size": self.spec.group_size,
                "scale_dtype": self.spec.scale_dtype, "method": self.method.name,
                "calibration": [data.samples, data.seq_len, str(data.text_file or "")]}


def is_quantized_dir(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST_NAME).is_file()


def is_convertible(path: Path) -> bool:
    """A .gguf file, or a directory holding config.json with safetensors or one .gguf."""
    if path.is_file():
        return path.suffix.lower() == ".gguf"
    return path.is_dir() and ((path / "config.json").is_file() or any(path.glob("*.gguf")))


def source_fingerprint(path: Path) -> dict:
    """What identifies a source's content cheaply: path, sizes and modification times."""
    path = path.resolve()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return {"path": str(path),
            "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def cache_dir_for(path: Path, settings: ConversionSettings) -> Path:
    """Where SOURCE converted with SETTINGS is cached."""
    blob = json.dumps({"source": source_fingerprint(path), "settings": settings.key()},
                      sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
    spec = settings.spec
    return (cache_root() / CONVERTED /
            f"{_model_name(path)}-{settings.method.name}-{spec.scheme}-g{spec.group_size}-"
            f"{digest}")


def _model_name(path: Path) -> str:
    """A readable name: the GGUF's stem, the directory's name, or ORG--NAME for an HF
    cache snapshot (.../models--ORG--NAME/snapshots/HASH)."""
    path = path.resolve()
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        name = path.parent.parent.name[len("models--"):]
    else:
        name = path.stem if path.is_file() else path.name
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80] or "model"


def ensure_converted(ref, settings: ConversionSettings = ConversionSettings(),
                     progress: bool = True,
                     notify: Optional[Callable[[str], None]] = None) -> Path:
    """The quantized directory for REF: REF itself when it is one; else (a GGUF file, an
    HF checkpoint directory, id or cache folder) its cached conversion, made on first use.

    ``notify`` gets one-line notes: where the conversion went and how to reuse it, the
    method chosen and why (see checkpoint/methods.py)."""
    say = notify or logger.info
    path = resolve_model_path(ref)
    if is_quantized_dir(path):
        return path
    if not is_convertible(path):
        raise FormatError(not_a_quantized_dir(path) if not path.is_dir() else
                          f"{path}: neither a quantized directory ({MANIFEST_NAME}) nor a "
                          "Hugging Face checkpoint (config.json) nor a .gguf; pass one of those")
    target = cache_dir_for(path, settings)
    if target.is_dir() and not settings.reconvert:
        try:
            verify_directory(target)
            say(f"using {target} (converted from {path} earlier; --reconvert redoes it)")
            return target
        except FormatError as exc:
            say(f"converting again: {exc}")
    summary = _convert(path, target, settings, progress, say,
                       f"converting {path} once into {target}")
    say(f"converted in {summary.seconds:.0f} s ({summary.how()}); later runs with {ref} "
        f"reuse it, or pass {target} directly")
    return target


def _convert(path: Path, target: Path, settings: ConversionSettings, progress: bool,
             say: Callable[[str], None], announce: str):
    from .convert import convert

    def run(requantize: bool):
        return convert(path, target, settings.spec, force=True, progress=progress,
                       requantize=requantize, method=settings.method, notify=say,
                       announce=announce)

    try:
        return run(False)
    except InexactImportError as exc:
        logger.info("%s", exc)
        say(f"{path.name}: its linears cannot be imported exactly (IQ or other types with no "
            "exact import hold most of them); "
            f"quantizing them again with {settings.spec.scheme} g{settings.spec.group_size} "
            "(lossy, docs/import.md)")
        return run(True)
