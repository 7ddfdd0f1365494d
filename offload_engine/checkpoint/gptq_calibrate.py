"""Layer-by-layer GPTQ: collect each linear's input Hessian H = X^T X over the calibration
tokens, quantize the layer's linears with GPTQ (quant/gptq.py), and feed the next layer
with the outputs of the *quantized* layer, as the reference implementation does, so that
each layer corrects for the rounding of the layers before it.

Per decoder layer (float32, on ``--device``): its weights, the calibration hidden states
(samples x seq_len x hidden, input and output), one Hessian per distinct input (q/k/v
share one, gate/up share one: four per layer, the largest intermediate^2 for down_proj)
and GPTQ's temporaries (a few K x K matrices for the widest input).

Unlike awq, the result is not a few small vectors: the quantized weights themselves are
kept (on the CPU, 0.5-0.6 bytes per parameter) until convert.py writes them, e.g. about
17 GB of host RAM for a 32B model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import nn

from ..model import architecture
from ..quant.gptq import GPTQSettings, gptq_quantize
from ..quant.layout import QuantSpec
from ..quant.quantize import QuantizedWeight, dequantize_weight
from .calibrate import (
    LLAMA_GROUPS,
    CalibrationSettings,
    FoldPlan,
    LayerPass,
    attach_recorders,
    materialize,
    plan_layer,
    start_pass,
    timed_layers,
)

logger = logging.getLogger(__name__)


@dataclass
class GPTQResult:
    """The quantized linears, keyed by checkpoint weight name, on the CPU."""

    weights: Dict[str, QuantizedWeight] = field(default_factory=dict)
    layers: int = 0  # decoder layers calibrated
    plan: Optional[FoldPlan] = None  # awq-gptq: the AWQ folds, applied before rounding


class _HessianRecorder:
    """Accumulates X^T X / tokens of one linear's input (float32, on the input's device)."""

    def __init__(self):
        self.hessian = None
        self.count = 0

    def __call__(self, module, args) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)  # (T, K)
        if self.hessian is None:
            self.hessian = torch.zeros(x.shape[1], x.shape[1], device=x.device)
        # a running mean keeps the sum's magnitude, and float32 error, independent of T
        total = self.count + x.shape[0]
        self.hessian.mul_(self.count / total).addmm_(x.T, x, alpha=1.0 / total)
        self.count = total


def calibrate_gptq(source, skeleton: nn.Module, spec: QuantSpec,
                   settings: CalibrationSettings = CalibrationSettings(),
                   gptq: GPTQSettings = GPTQSettings(), progress: bool = True,
                   fold: bool = False, notify=None) -> GPTQResult:
    """Quantize every decoder linear (and an untied lm_head) of ``source`` with GPTQ.

    ``fold`` (awq-gptq): per layer, first search and fold AWQ's scales (calibrate.py),
    then round the scaled weights with GPTQ on the Hessians of the scaled inputs.
    """
    run = start_pass(source, skeleton, settings, "awq-gptq" if fold else "gptq")
    result = GPTQResult(plan=FoldPlan() if fold else None)
    for index in timed_layers(len(run.layers), progress, notify,
                              "awq-gptq" if fold else "gptq"):
        prefix = f"{run.prefix}.{index}."
        layer = run.layer(index)
        stats = attach_recorders(layer, run.hidden.shape[0] * run.hidden.shape[1],
                                 settings.search_tokens) if fold else None
        hessians = _record_hessians(run, layer, settings.batch)
        if index == 0:
            _warn_if_few_tokens(run, hessians)
        if fold:
            for handle in stats.handles:
                handle.remove()
            hessians = _fold_layer(result.plan, layer, prefix, stats, hessians, spec,
                                   settings)
        _quantize_layer(layer, prefix, hessians, spec, gptq, result)
        del hessians, stats
        run.hidden = run.run(layer, settings.batch)  # the quantized layer feeds the next
        result.layers += 1
        del layer
    _quantize_head(run, skeleton, source.config, spec, gptq, result)
    return result


@torch.no_grad()
def _fold_layer(plan: FoldPlan, layer: nn.Module, prefix: str, stats, hessians, spec,
                settings: CalibrationSettings) -> Dict[str, torch.Tensor]:
    """Decide this layer's AWQ scales, fold them into its weights in place (its float
    outputs do not change) and return the Hessians of the scaled inputs x / s:
    H' = diag(1/s) H diag(1/s)."""
    plan_layer(plan, layer, prefix, stats, spec, settings)
    plan.layers += 1
    for key, tensor in layer.state_dict().items():
        folded = plan.apply(prefix + key, tensor)
        if folded is not tensor:
            tensor.copy_(folded)
    scaled = {}
    for path, hessian in hessians.items():
        scale = plan.column_scales.get(f"{prefix}{path}.weight")
        if scale is None:  # a group AWQ skipped (o_proj under grouped-query attention)
            scaled[path] = hessian
            continue
        inverse = 1.0 / scale.to(hessian.device)
        scaled[path] = hessian * inverse.unsqueeze(1) * inverse.unsqueeze(0)
    return scaled


def _record_hessians(run: LayerPass, layer: nn.Module, batch: int) -> Dict[str, torch.Tensor]:
    """Linear path -> the Hessian of its input, from one forward of the float layer."""
    recorders: Dict[str, _HessianRecorder] = {}
    handles = []
    for group in LLAMA_GROUPS:  # linears of a group share their input: one Hessian
        recorder = _HessianRecorder()
        handles.append(layer.get_submodule(group.linears[0]).register_forward_pre_hook(
            recorder))
        recorders.update((path, recorder) for path in group.linears)
    try:
        run.run(layer, batch)  # outputs unused: the next layer sees the quantized ones
    finally:
        for handle in handles:
            handle.remove()
    return {path: recorder.hessian for path, recorder in recorders.items()}


def _warn_if_few_tokens(run: LayerPass, hessians: Dict[str, torch.Tensor]) -> None:
    """Fewer tokens than inputs leave H singular: GPTQ then fits the few directions it saw
    and can do worse than round-to-nearest (measured on the tiny test models: 128 tokens
    for 160 inputs raised the KL above rtn's; 2048 tokens lowered it below)."""
    tokens = run.hidden.shape[0] * run.hidden.shape[1]
    widest = max(hessian.shape[0] for hessian in hessians.values())
    if tokens < widest:
        logger.warning("GPTQ calibrates on %d tokens, fewer than the %d inputs of the widest "
                       "linear: raise --calib-samples or --calib-seq-len", tokens, widest)


@torch.no_grad()
def _quantize_layer(layer: nn.Module, prefix: str, hessians: Dict[str, torch.Tensor],
                    spec: QuantSpec, gptq: GPTQSettings, result: GPTQResult) -> None:
    """GPTQ every linear of the layer; its weights become their dequantized values."""
    for path, hessian in hessians.items():
        linear = layer.get_submodule(path)
        name = f"{prefix}{path}.weight"
        quantized = gptq_quantize(linear.weight, hessian, spec, gptq, name=name)
        linear.weight.copy_(dequantize_weight(quantized))
        result.weights[name] = _to_cpu(quantized)


@torch.no_grad()
def _quantize_head(run: LayerPass, skeleton: nn.Module, config, spec: QuantSpec,
                   gptq: GPTQSettings, result: GPTQResult) -> None:
    """An untied lm_head is a linear too: GPTQ it on the final norm of the last hidden
    states. A tied one shares the embedding, which stays dense."""
    if architecture.ties_embeddings(config):
        return
    head = skeleton.get_output_embeddings()
    modules = {module: name for name, module in skeleton.named_modules()}
    norm = materialize(skeleton.model.norm, f"{modules[skeleton.model.norm]}.", run.read,
                       run.device)
    recorder = _HessianRecorder()
    for chunk in run.hidden:  # one sequence at a time: (L, H)
        recorder(None, (norm(chunk),))
    name = f"{modules[head]}.weight"
    weight = run.read(name).to(run.device, torch.float32)
    result.weights[name] = _to_cpu(gptq_quantize(weight, recorder.hessian, spec, gptq,
                                                 name=name))


def _to_cpu(quantized: QuantizedWeight) -> QuantizedWeight:
    parts = {key: value.cpu() for key, value in quantized.components().items()}
    return QuantizedWeight.from_parts(parts, quantized.spec, quantized.out_features,
                                      quantized.in_features)

