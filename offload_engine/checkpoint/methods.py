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
- ``auto``: awq where its scales fold (FOLDABLE_MODEL_TYPES) and calibration is
  affordable (a GPU calibrates, or the model is small), else rtn; choose_method says
  which and why.

convert.py asks prepare_method() for a PreparedMethod and calls ``adjust`` on every
tensor and ``quantize`` on every linear weight as it streams them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from ..errors import ConfigError, ConversionError
from ..quant.gptq import GPTQSettings
from ..quant.layout import QuantSpec
from ..quant.quantize import QuantizedWeight, quantize_weight
from ..quant.schemes import AUTO_METHOD, DEFAULT_METHOD, METHODS  # noqa: F401 (re-exported)
from ..quant.search import SearchSettings, search_quantize
from .calibrate import FOLDABLE_MODEL_TYPES, CalibrationSettings, FoldPlan, calibrate
from .gptq_calibrate import GPTQResult, calibrate_gptq

logger = logging.getLogger(__name__)
# Without a GPU, `auto` calibrates (awq) only models below this many parameters: the
# 135M demo-sized SmolLM2 took 5 min 25 s to calibrate on the 2-core CPU test machine,
# against 10 s for rtn (issue 26), too long for a first `run`.
AUTO_AWQ_CPU_MAX_PARAMS = 100_000_000


@dataclass(frozen=True)
class MethodSettings:
    """Which method quantizes the linears, and its knobs."""

    # one of METHODS, or AUTO_METHOD (resolved by choose_method). The library default stays
    # rtn: it needs no tokenizer or calibration pass (the tests rely on that); the CLI and
    # the automatic conversion of run/chat/serve/load default to AUTO_METHOD.
    name: str = "rtn"
    search: SearchSettings = SearchSettings()  # clip and awq: the per-group range search
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)  # calibrated
    gptq: GPTQSettings = GPTQSettings()  # gptq, awq-gptq: dampening and block size

    def __post_init__(self) -> None:
        if self.name not in METHODS + (AUTO_METHOD,):
            raise ConfigError(f"unknown --method {self.name!r}: use one of "
                              f"{', '.join((AUTO_METHOD,) + METHODS)}")


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


def choose_method(settings: MethodSettings, config, parameters: int) -> tuple:
    """(settings, note): ``auto`` resolved to awq or rtn with a one-line note saying what
    was chosen, why, and how to ask for the other; any other method as it is, note ""."""
    if settings.name != AUTO_METHOD:
        return settings, ""
    model_type = getattr(config, "model_type", None)
    on_gpu = settings.calibration.device.startswith("cuda")
    size = f"{parameters / 1e6:.0f}M-parameter"
    if model_type not in FOLDABLE_MODEL_TYPES:
        name, why = "rtn", (f"awq cannot fold a {model_type!r} model's scales (it folds "
                            f"{', '.join(FOLDABLE_MODEL_TYPES)}); --method clip searches each "
                            "group's range without calibration text")
    elif not on_gpu and parameters > AUTO_AWQ_CPU_MAX_PARAMS:
        name, why = "rtn", (f"no GPU to calibrate a {size} model on (awq is chosen on a "
                            f"CPU below {AUTO_AWQ_CPU_MAX_PARAMS / 1e6:.0f}M); pass --method "
                            "awq to calibrate anyway (better quality, an estimate of the time "
                            "shows after the first layer)")
    else:
        name, why = "awq", ((f"calibrating on {settings.calibration.device}" if on_gpu
                             else f"a {size} model calibrates quickly on the CPU")
                            + "; --method rtn converts fastest")
    return replace(settings, name=name), f"method {name}: {why}"


def prepare_method(settings: MethodSettings, source, skeleton, spec: QuantSpec,
                   progress: bool = True,
                   notify: Optional[Callable[[str], None]] = None) -> PreparedMethod:
    """``notify`` gets one line estimating a long calibration's time, after its first layer."""
    if settings.name not in ("awq", "gptq", "awq-gptq"):
        return PreparedMethod(settings)
    started = time.perf_counter()
    if settings.name in ("gptq", "awq-gptq"):
        result = calibrate_gptq(source, skeleton, spec, settings.calibration, settings.gptq,
                                progress, fold=settings.name == "awq-gptq", notify=notify)
        seconds = time.perf_counter() - started
        logger.info("%s calibration: %d layers in %.1f s", settings.name, result.layers,
                    seconds)
        return PreparedMethod(settings, result.plan, seconds, gptq=result)
    plan = calibrate(source, skeleton, spec, settings.calibration, progress, notify)
    seconds = time.perf_counter() - started
    logger.info("AWQ calibration: %d layers in %.1f s", plan.layers, seconds)
    return PreparedMethod(settings, plan, seconds)
