"""Layer-by-layer AWQ calibration: run calibration text through the source checkpoint one
decoder layer at a time and decide, per group of linears sharing an input, the scale to
fold into what produced that input. The pass itself (start_pass, LayerPass) is shared with
GPTQ (gptq_calibrate.py).

Memory holds one decoder layer's weights (float32, on ``--device``) plus the calibration
hidden states (samples x seq_len x hidden, twice: input and output of the layer) plus, per
input group, at most ``search_tokens`` rows of inputs for scoring the scale candidates.
The result is a FoldPlan of small vectors; convert.py applies it while streaming the
tensors to disk, so no modified full-size weight is ever kept.

Where scales are folded (Llama-style decoders: llama, mistral, qwen2, qwen3,
smollm3, ministral):
- q/k/v_proj: into input_layernorm's weight (an RMSNorm multiplies by its weight);
- gate/up_proj: into post_attention_layernorm's weight;
- down_proj: into the rows of up_proj (the MLP's product act(gate) * up is linear in up);
- o_proj: into the rows of v_proj, only when they have the same width. With grouped-query
  attention (fewer KV heads than query heads, e.g. SmolLM2, Qwen2.5-32B) one v_proj row
  feeds several o_proj inputs, so no per-input scale can be folded: o_proj is skipped
  (quantized with the importance-weighted search only), as in the AWQ reference code.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError, SourceError
from ..quant.awq import ScaleSearchSettings, search_scales
from ..quant.layout import QuantSpec
from ..quant.quantize import check_finite, dequantize_weight, quantize_weight
from . import stfile
from .calibration_data import CalibrationData, calibration_ids

logger = logging.getLogger(__name__)
# Decoder layers laid out as Llama's (input_layernorm -> q/k/v, v -> o,
# post_attention_layernorm -> gate/up, up -> down), with RMSNorm weights that scale rows
FOLDABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "ministral")
LONG_CALIBRATION_S = 30.0  # an estimate is announced when the whole pass looks longer


@dataclass(frozen=True)
class CalibrationSettings:
    """How the calibration pass runs."""

    data: CalibrationData = CalibrationData()
    device: str = "cpu"  # where the layer and the activations live: cpu or cuda
    search_tokens: int = 2048  # input rows that score each scale candidate, per group
    batch: int = 4  # sequences per layer forward (bounds the attention temporaries)
    scale_search: ScaleSearchSettings = ScaleSearchSettings()

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device {self.device!r}: use cpu or cuda")
        if self.search_tokens < 1 or self.batch < 1:
            raise ConfigError("search_tokens and batch must be at least 1")


@dataclass(frozen=True)
class FoldGroup:
    """Linears sharing one input, and what produced that input."""

    linears: tuple  # attribute paths inside the decoder layer, e.g. ("self_attn.q_proj",)
    producer: str  # attribute path of the norm or linear whose output rows take 1/s
    producer_is_norm: bool


LLAMA_GROUPS = (
    FoldGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "input_layernorm", True),
    FoldGroup(("self_attn.o_proj",), "self_attn.v_proj", False),
    FoldGroup(("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", True),
    FoldGroup(("mlp.down_proj",), "mlp.up_proj", False),
)


@dataclass
class FoldPlan:
    """What calibration decided, keyed by checkpoint tensor name. All vectors float32."""

    column_scales: Dict[str, torch.Tensor] = field(default_factory=dict)  # weight *= s (cols)
    row_divisors: Dict[str, torch.Tensor] = field(default_factory=dict)  # tensor /= d (rows)
    importance: Dict[str, torch.Tensor] = field(default_factory=dict)  # weight -> (K,)
    skipped: List[str] = field(default_factory=list)  # linears left unscaled, and why
    alphas: List[float] = field(default_factory=list)
    layers: int = 0  # decoder layers calibrated

    def apply(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor as it must be stored: float32 when changed, untouched otherwise."""
        divisor, scale = self.row_divisors.get(name), self.column_scales.get(name)
        if divisor is None and scale is None:
            return tensor
        result = tensor.to(torch.float32)
        if divisor is not None:
            result = result / (divisor if result.dim() == 1 else divisor.unsqueeze(1))
        if scale is not None:
            result = result * scale
        return result


def tensor_reader(source) -> Callable[[str], torch.Tensor]:
    """name -> tensor, by random access: a GGUF source reads one tensor, safetensors seek."""
    if hasattr(source, "read_tensor"):
        return source.read_tensor
    index = {key: (shard, info) for shard, header in source.headers
             for key, info in header.items()}

    def read(name: str) -> torch.Tensor:
        if name not in index:
            raise SourceError(f"{source.path}: no tensor {name!r} for calibration")
        return stfile.read_tensor(*index[name])

    return read


def load_source_tokenizer(source):
    from transformers import AutoTokenizer

    try:
        if source.kind == "gguf":
            return AutoTokenizer.from_pretrained(source.path.parent, gguf_file=source.path.name)
        return AutoTokenizer.from_pretrained(source.path)
    except (OSError, ValueError, KeyError) as exc:
        raise SourceError(f"{source.path}: calibration needs the model's tokenizer files "
                          f"beside the weights ({exc}); copy them there or use --method "
                          "clip, which needs no calibration") from exc


def check_foldable(skeleton: nn.Module, config, method: str = "awq") -> nn.ModuleList:
    """The decoder layers, if this architecture's layers run one at a time here (and their
    scales can be folded); else a ConfigError."""
    model_type = getattr(config, "model_type", None)
    inner = getattr(skeleton, "model", None)
    layers = getattr(inner, "layers", None)
    if model_type not in FOLDABLE_MODEL_TYPES or layers is None:
        raise ConfigError(
            f"--method {method} cannot calibrate a {model_type!r} model layer by layer "
            f"(supported: {', '.join(FOLDABLE_MODEL_TYPES)}); use --method clip, which "
            "needs no calibration")
    return layers


@dataclass
class LayerPass:
    """The state of a layer-by-layer pass: what feeds the next decoder layer."""

    layers: nn.ModuleList  # the skeleton's decoder layers (on meta)
    prefix: str  # their checkpoint name prefix, e.g. "model.layers"
    read: Callable[[str], torch.Tensor]  # checkpoint name -> tensor
    device: torch.device
    hidden: torch.Tensor  # (S, L, H) float32: the next layer's input
    mask: torch.Tensor  # (1, 1, L, L) additive causal mask
    position_embeddings: tuple  # the rotary (cos, sin) of positions 0..L-1

    def layer(self, index: int) -> nn.Module:
        """Decoder layer ``index`` with its checkpoint weights, float32 on the device."""
        return materialize(self.layers[index], f"{self.prefix}.{index}.", self.read,
                           self.device)

    def run(self, layer: nn.Module, batch: int) -> torch.Tensor:
        """``layer``'s outputs for the current hidden states (which it leaves as they are)."""
        with torch.no_grad():
            return forward_layer(layer, self.hidden, self.mask, self.position_embeddings,
                                 batch)


def start_pass(source, skeleton: nn.Module, settings: CalibrationSettings,
               method: str) -> LayerPass:
    """Embed the calibration text and get ready to run the decoder layers one by one."""
    layers = check_foldable(skeleton, source.config, method)
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu")
    read = tensor_reader(source)
    ids = calibration_ids(load_source_tokenizer(source), settings.data)
    hidden = _embed(read, skeleton, ids, device)  # (S, L, H) float32
    rotary = copy.deepcopy(skeleton.model.rotary_emb).to(device)
    positions = torch.arange(ids.shape[1], device=device).unsqueeze(0)
    position_embeddings = rotary(hidden[:1], positions)
    return LayerPass(layers, _layers_prefix(skeleton, layers), read, device, hidden,
                     _causal_mask(ids.shape[1], device), position_embeddings)


def timed_layers(count: int, progress: bool, notify: Optional[Callable[[str], None]],
                 method: str) -> Iterator[int]:
    """0..count-1 under a progress bar; after the first layer, when the whole pass looks
    longer than LONG_CALIBRATION_S, ``notify`` gets one line with the estimated time."""
    bar = tqdm(range(count), desc="calibrating", unit="layer", disable=not progress)
    started = time.perf_counter()
    for index in bar:
        yield index
        if index == 0 and notify is not None and count > 1:
            first = time.perf_counter() - started
            if first * count >= LONG_CALIBRATION_S:
                with tqdm.external_write_mode():
                    notify(f"{method} calibration: about {_duration(first * count)} for "
                           f"{count} layers (the first took {first:.1f} s); Ctrl-C stops it, "
                           "--method rtn converts without calibrating")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def calibrate(source, skeleton: nn.Module, spec: QuantSpec,
              settings: CalibrationSettings = CalibrationSettings(),
              progress: bool = True,
              notify: Optional[Callable[[str], None]] = None) -> FoldPlan:
    """Run the layer-by-layer pass and return what to fold and how to weigh errors."""
    run = start_pass(source, skeleton, settings, "awq")
    plan = FoldPlan()
    for index in timed_layers(len(run.layers), progress, notify, "awq"):
        layer = run.layer(index)
        stats = attach_recorders(layer, run.hidden.shape[0] * run.hidden.shape[1],
                                  settings.search_tokens)
        run.hidden = run.run(layer, settings.batch)
        for handle in stats.handles:
            handle.remove()
        plan_layer(plan, layer, f"{run.prefix}.{index}.", stats, spec, settings)
        plan.layers += 1
        del layer, stats
    logger.info("AWQ: alphas chosen %s; skipped: %s", plan.alphas, plan.skipped or "none")
    return plan


def _layers_prefix(skeleton: nn.Module, layers: nn.ModuleList) -> str:
    for name, module in skeleton.named_modules():
        if module is layers:
            return name
    raise ConfigError("cannot locate the decoder layers in the model")


def _embed(read, skeleton, ids: torch.Tensor, device) -> torch.Tensor:
    embedding = skeleton.get_input_embeddings()
    name = next(n for n, p in skeleton.named_parameters() if p is embedding.weight)
    table = read(name)
    hidden = torch.nn.functional.embedding(ids, table).to(device, torch.float32)
    scale = getattr(embedding, "embed_scale", None)  # Gemma-style scaled embeddings
    return hidden * scale if scale is not None else hidden


def _causal_mask(length: int, device) -> torch.Tensor:
    """(1, 1, L, L) additive causal mask; works with eager and sdpa attention alike."""
    blocked = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
    mask = torch.zeros(length, length, device=device)
    return mask.masked_fill(blocked, torch.finfo(torch.float32).min)[None, None]


def materialize(meta_layer: nn.Module, prefix: str, read, device) -> nn.Module:
    layer = copy.deepcopy(meta_layer).to_empty(device=device)
    state = {key: read(prefix + key).to(device, torch.float32)
             for key in layer.state_dict()}
    layer.load_state_dict(state)
    return layer.float().eval()


def forward_layer(layer, hidden, mask, position_embeddings, batch: int) -> torch.Tensor:
    outputs = torch.empty_like(hidden)
    for start in range(0, hidden.shape[0], batch):
        chunk = hidden[start: start + batch]
        out = layer(chunk, attention_mask=mask, position_embeddings=position_embeddings,
                    position_ids=None, use_cache=False)
        outputs[start: start + batch] = out[0] if isinstance(out, tuple) else out
    return outputs


@dataclass
class _Recorder:
    """Running statistics of one linear's input, plus a strided sample of its rows."""

    stride: int
    keep_rows: bool  # only the first linear of a group: its rows score the scales
    abs_sum: Optional[torch.Tensor] = None
    square_sum: Optional[torch.Tensor] = None
    count: int = 0
    rows: list = field(default_factory=list)

    def __call__(self, module, args) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
        if self.abs_sum is None:
            self.abs_sum = torch.zeros(x.shape[1], device=x.device)
            self.square_sum = torch.zeros(x.shape[1], device=x.device)
        self.abs_sum += x.abs().sum(0)
        self.square_sum += x.square().sum(0)
        if self.keep_rows:
            first = (-self.count) % self.stride  # one global stride across batches
            self.rows.append(x[first:: self.stride].clone())
        self.count += x.shape[0]


@dataclass
class _LayerStats:
    recorders: Dict[str, _Recorder]
    handles: list


def attach_recorders(layer: nn.Module, tokens: int, search_tokens: int) -> _LayerStats:
    stride = max(1, tokens // search_tokens)
    recorders, handles = {}, []
    for group in LLAMA_GROUPS:
        for path in group.linears:
            recorder = _Recorder(stride, keep_rows=path == group.linears[0])
            recorders[path] = recorder
            handles.append(layer.get_submodule(path).register_forward_pre_hook(recorder))
    return _LayerStats(recorders, handles)


@torch.no_grad()
def plan_layer(plan: FoldPlan, layer: nn.Module, prefix: str, stats: _LayerStats,
                spec: QuantSpec, settings: CalibrationSettings) -> None:
    """Search each group's scale, record folds and per-linear importance."""
    for group in LLAMA_GROUPS:
        first = stats.recorders[group.linears[0]]
        mean_abs = first.abs_sum / first.count
        weights = [layer.get_submodule(p).weight for p in group.linears]
        for path, weight in zip(group.linears, weights, strict=True):
            check_finite(f"{prefix}{path}.weight", weight)  # named here, not in the search
        producer = layer.get_submodule(group.producer)
        if not group.producer_is_norm and producer.out_features != weights[0].shape[1]:
            plan.skipped.append(f"{prefix}{group.linears[0]} (producer {group.producer} has "
                                f"{producer.out_features} outputs, not {weights[0].shape[1]})")
            scales = torch.ones_like(mean_abs)
        else:
            inputs = torch.cat(first.rows)
            result = search_scales(inputs, mean_abs, weights, _rtn(spec), settings.scale_search)
            scales = result.scales
            plan.alphas.append(result.alpha)
            _record_fold(plan, prefix, group, producer, scales)
        for path in group.linears:
            recorder = stats.recorders[path]
            plan.importance[f"{prefix}{path}.weight"] = (
                recorder.square_sum / recorder.count / scales.square()).cpu()


def _record_fold(plan: FoldPlan, prefix: str, group: FoldGroup, producer: nn.Module,
                 scales: torch.Tensor) -> None:
    scales = scales.cpu()
    for path in group.linears:
        _compose(plan.column_scales, f"{prefix}{path}.weight", scales)
    _compose(plan.row_divisors, f"{prefix}{group.producer}.weight", scales)
    if getattr(producer, "bias", None) is not None:
        _compose(plan.row_divisors, f"{prefix}{group.producer}.bias", scales)


def _compose(table: Dict[str, torch.Tensor], name: str, factor: torch.Tensor) -> None:
    table[name] = table[name] * factor if name in table else factor.clone()


def _rtn(spec: QuantSpec):
    def fake_quantize(weight: torch.Tensor) -> torch.Tensor:
        return dequantize_weight(quantize_weight(weight, spec)).to(weight.device)

    return fake_quantize
