"""Quantization methods: how each linear's codes and scales are chosen during conversion.

Every method writes the same format (quant/layout.py), so the runtime and the kernels
never know which one ran:

- ``rtn``: round-to-nearest over each group's full range (quant/quantize.py).
- ``clip``: calibration-free; each group searches a shrinking range and re-fits its scale
  to minimise the squared weight error (quant/search.py).
- ``awq``: activation-aware; a layer-by-layer pass over calibration text picks per-channel
  scales folded into the preceding norm or linear (checkpoint/calibrate.py), then each
  group searches its range minimising the activation-weighted error.
- ``gptq``: error-compensating rounding; the same layer-by-layer pass collects each
  linear's input Hessian and rounds its columns one by one, pushing each column's error
  onto the columns not yet rounded (quant/gptq.py, checkpoint/gptq_calibrate.py). The
  quantized weights themselves are kept in host RAM (0.5-0.6 bytes per parameter) until
  they are written.
- ``awq-gptq``: per layer, AWQ's scales are searched and folded first, then the scaled
  weights are rounded with GPTQ on the Hessians of the scaled inputs.

convert.py asks prepare_method() for a PreparedMethod and calls ``adjust`` on every
tensor and ``quantize`` on every linear weight as it streams them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import ConfigError, ConversionError
from ..quant.gptq import GPTQSettings
from ..quant.layout import QuantSpec
from ..quant.quantize import QuantizedWeight, quantize_weight
from ..quant.schemes import DEFAULT_METHOD, METHODS  # noqa: F401 (re-exported)
from ..quant.search import SearchSettings, search_quantize
from .calibrate import CalibrationSettings, FoldPlan, calibrate
from .gptq_calibrate import GPTQResult, calibrate_gptq

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MethodSettings:
    """Which method quantizes the linears, and its knobs."""

    # one of METHODS. The library default stays rtn: it needs no tokenizer or calibration
    # pass (the demo's first-run conversion and the tests rely on that); the CLI defaults
    # to DEFAULT_METHOD.
    name: str = "rtn"
    search: SearchSettings = SearchSettings()  # clip and awq: the per-group range search
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)  # calibrated
    gptq: GPTQSettings = GPTQSettings()  # gptq, awq-gptq: dampening and block size

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ConfigError(f"unknown --method {self.name!r}: use one of {', '.join(METHODS)}")


class PreparedMethod:
    """A method ready to run: folds to apply (awq, awq-gptq), the weights GPTQ already
    quantized (gptq, awq-gptq), and the per-linear quantizer."""

    def __init__(self, settings: MethodSettings, plan: Optional[FoldPlan] = None,
                 calibration_seconds: float = 0.0, gptq: Optional[GPTQResult] = None):
        self.settings = settings
        self.plan = plan
        self.gptq = gptq
        self.calibration_seconds = calibration_seconds
        self.calibration_layers = (gptq.layers if gptq is not None
                                   else plan.layers if plan is not None else 0)

    def adjust(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor to store or quantize (awq: with its folded scales)."""
        return tensor if self.plan is None else self.plan.apply(name, tensor)

    def quantize(self, name: str, weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
        if self.settings.name == "rtn":
            return quantize_weight(weight, spec, name=name)
        if self.gptq is not None:
            return self._take_gptq(name, weight)
        importance = None if self.plan is None else self.plan.importance.get(name)
        return search_quantize(weight, spec, importance, self.settings.search, name=name)

    def _take_gptq(self, name: str, weight: torch.Tensor) -> QuantizedWeight:
        """The weight GPTQ quantized during calibration, released once handed over."""
        quantized = self.gptq.weights.pop(name, None)
        if quantized is None:
            raise ConversionError(f"tensor {name!r}: GPTQ calibration did not quantize this "
                                  "linear; the checkpoint and its config disagree")
        if (quantized.out_features, quantized.in_features) != tuple(weight.shape):
            raise ConversionError(f"tensor {name!r}: GPTQ quantized shape "
                                  f"{(quantized.out_features, quantized.in_features)}, the "
                                  f"checkpoint holds {tuple(weight.shape)}")
        return quantized

    def describe(self) -> dict:
        """What goes into the manifest's source record."""
        info = {"name": self.settings.name}
        if self.plan is not None or self.gptq is not None:
            data = self.settings.calibration.data
            info.update(calibration_samples=data.samples, calibration_seq_len=data.seq_len,
                        calibration_text=str(data.text_file or "pydoc_data.topics (2nd half)"))
        if self.plan is not None:
            info.update(skipped=self.plan.skipped)
        if self.gptq is not None:
            info.update(damping=self.settings.gptq.damping,
                        block_size=self.settings.gptq.block_size, act_order=False)
        return info


def prepare_method(settings: MethodSettings, source, skeleton, spec: QuantSpec,
                   progress: bool = True) -> PreparedMethod:
    if settings.name not in ("awq", "gptq", "awq-gptq"):
        return PreparedMethod(settings)
    started = time.perf_counter()
    if settings.name in ("gptq", "awq-gptq"):
        result = calibrate_gptq(source, skeleton, spec, settings.calibration, settings.gptq,
                                progress, fold=settings.name == "awq-gptq")
        seconds = time.perf_counter() - started
        logger.info("%s calibration: %d layers in %.1f s", settings.name, result.layers,
                    seconds)
        return PreparedMethod(settings, result.plan, seconds, gptq=result)
    plan = calibrate(source, skeleton, spec, settings.calibration, progress)
    seconds = time.perf_counter() - started
    logger.info("AWQ calibration: %d layers in %.1f s", plan.layers, seconds)
    return PreparedMethod(settings, plan, seconds)
