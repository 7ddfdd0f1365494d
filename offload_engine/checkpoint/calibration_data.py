"""Calibration text: what the activation-aware methods run through the model.

The default ships with Python: CPython's ``pydoc_data.topics`` texts joined in sorted key
order (the same text `eval` scores). `eval` scores a *prefix* of it (its first ``--tokens``
tokens, read from at most ``8 * tokens`` characters); calibration uses only the text from
the middle character onward. The two never overlap for ``eval --tokens`` up to about
29,000 on a tokenizer with 4+ characters per token (the joined text has about 465,000
characters), so the quality table is measured on text the calibration never saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..errors import ConfigError
from ..quant.schemes import DEFAULT_CALIB_SAMPLES, DEFAULT_CALIB_SEQ_LEN

# Calibration reads the default text from this fraction of its length on; eval reads a
# prefix. See the module docstring for how far apart they stay.
CALIBRATION_START_FRACTION = 0.5


@dataclass(frozen=True)
class CalibrationData:
    """Which text to calibrate on, and how much of it."""

    samples: int = DEFAULT_CALIB_SAMPLES  # sequences of calibration text
    seq_len: int = DEFAULT_CALIB_SEQ_LEN  # tokens per sequence
    text_file: Optional[Path] = None  # UTF-8 text; None: the second half of pydoc topics

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ConfigError(f"--calib-samples must be at least 1, got {self.samples}")
        if self.seq_len < 2:
            raise ConfigError(f"--calib-seq-len must be at least 2, got {self.seq_len}")

    @property
    def tokens(self) -> int:
        return self.samples * self.seq_len


def pydoc_topics_text() -> str:
    """CPython's pydoc topics in sorted key order (sorted: independent of dict order)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def default_calibration_text() -> str:
    """The part of pydoc_topics_text() that `eval`'s default slice never reaches."""
    full = pydoc_topics_text()
    return full[int(len(full) * CALIBRATION_START_FRACTION):]


def calibration_text(data: CalibrationData) -> str:
    if data.text_file is None:
        return default_calibration_text()
    path = Path(data.text_file)
    if not path.is_file():
        raise ConfigError(f"--calib-file {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--calib-file {path}: cannot read it as UTF-8 text ({exc})") from exc
    if not text.strip():
        raise ConfigError(f"--calib-file {path} is empty: pass a file of ordinary text "
                          "(a few hundred KB of prose or code like the model's use)")
    return text


def calibration_ids(tokenizer, data: CalibrationData) -> torch.Tensor:
    """(samples, seq_len) token ids: windows spread evenly over the text, never overlapping."""
    text = calibration_text(data)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < data.tokens:
        where = f"--calib-file {data.text_file}" if data.text_file else "the default text"
        raise ConfigError(
            f"{where} has {len(ids)} tokens; calibration needs --calib-samples x "
            f"--calib-seq-len = {data.samples} x {data.seq_len} = {data.tokens}: pass a longer "
            "--calib-file or lower --calib-samples / --calib-seq-len")
    stride = (len(ids) - data.seq_len) // max(1, data.samples - 1) if data.samples > 1 else 0
    starts = [i * stride for i in range(data.samples)]
    return torch.tensor([ids[s: s + data.seq_len] for s in starts], dtype=torch.long)
