"""Which parameters of a transformers model are mixture-of-experts weights.

transformers 5 holds a layer's experts as fused 3-D parameters of one experts module
(``gate_up_proj`` of shape (experts, 2 * intermediate, hidden), ``down_proj`` of shape
(experts, hidden, intermediate)); the classes decorated with
``use_experts_implementation`` also say how those tensors are laid out (transposed,
gated, with biases). We quantize each expert's matrix as one linear weight, named
``<experts module>.<parameter>.<expert>`` like a linear module, so the converter, the
store, the cache and the planner treat it as any other quantized linear.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

from torch import nn

from ..errors import FormatError
from .architecture import LinearInfo

# The fused expert matrices a decorated experts class may hold, in compute order.
MATRIX_NAMES = ("gate_up_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ExpertMatrix:
    """One fused parameter of an experts module, as (out_features, in_features) per expert."""

    param: str  # "gate_up_proj", "up_proj" or "down_proj"
    out_features: int
    in_features: int
    transposed: bool  # stored per expert as (in, out): transformers' is_transposed


@dataclass(frozen=True)
class ExpertsInfo:
    """One experts module: how many experts and which matrices each one has."""

    module_name: str  # e.g. "model.layers.0.mlp.experts"
    num_experts: int
    matrices: Tuple[ExpertMatrix, ...]
    has_bias: bool

    def weight_module(self, param: str, expert: int) -> str:
        """The module-style name of one expert's matrix, e.g. ``...experts.down_proj.3``."""
        return expert_module_name(self.module_name, param, expert)

    def expert_modules(self, expert: int) -> Tuple[str, ...]:
        return tuple(self.weight_module(m.param, expert) for m in self.matrices)


def expert_module_name(experts_module: str, param: str, expert: int) -> str:
    return f"{experts_module}.{param}.{expert}"


def is_experts_module(module: nn.Module) -> bool:
    """A module holding fused 3-D expert parameters (decorated or not)."""
    return any(isinstance(getattr(module, name, None), nn.Parameter)
               and getattr(module, name).dim() == 3 for name in MATRIX_NAMES)


def find_experts(model: nn.Module) -> Dict[str, ExpertsInfo]:
    """Every experts module of ``model``, keyed by module name, in module order.

    Raises FormatError for an experts module we cannot run expert by expert (one not
    built with transformers' ``use_experts_implementation``, e.g. Llama 4's, which
    multiplies every token by every expert).
    """
    found = {}
    for name, module in model.named_modules():
        if not is_experts_module(module):
            continue
        if not hasattr(module, "is_transposed") or not hasattr(module, "has_gate"):
            raise FormatError(
                f"{type(module).__name__} ({name}) holds its experts in a layout offload-engine "
                "does not run (not a transformers use_experts_implementation class); this "
                f"model type ({getattr(getattr(model, 'config', None), 'model_type', '?')}) "
                "is not supported")
        found[name] = _describe(name, module)
    return found


def _describe(name: str, module: nn.Module) -> ExpertsInfo:
    transposed = bool(module.is_transposed)
    params = ("gate_up_proj", "down_proj") if module.has_gate else ("up_proj", "down_proj")
    matrices = []
    count = None
    for param in params:
        tensor = getattr(module, param, None)
        if tensor is None or tensor.dim() != 3:
            raise FormatError(f"{name}.{param}: expected a 3-D experts parameter, found "
                              f"{None if tensor is None else tuple(tensor.shape)}; this "
                              "experts layout is not supported")
        experts, rows, cols = tensor.shape
        if count not in (None, experts):
            raise FormatError(f"{name}: its expert parameters disagree on the expert count")
        count = experts
        out_features, in_features = (cols, rows) if transposed else (rows, cols)
        matrices.append(ExpertMatrix(param, out_features, in_features, transposed))
    if getattr(module, "is_concatenated", True) is False and not hasattr(module, "_apply_gate"):
        raise FormatError(f"{name}: interleaved gate/up experts without a gate function")
    return ExpertsInfo(name, count, tuple(matrices), bool(getattr(module, "has_bias", False)))


def expert_linears(experts: Dict[str, ExpertsInfo]) -> Dict[str, LinearInfo]:
    """One LinearInfo per expert per matrix (the bias, if any, stays a dense tensor)."""
    found = {}
    for info in experts.values():
        for expert in range(info.num_experts):
            for matrix in info.matrices:
                name = info.weight_module(matrix.param, expert)
                found[name] = LinearInfo(name, matrix.in_features, matrix.out_features,
                                         has_bias=False, is_lm_head=False,
                                         is_expert=True)
    return found


def split_expert_name(module: str, experts: Dict[str, ExpertsInfo]):
    """``...experts.down_proj.3`` -> (ExpertsInfo, ExpertMatrix, 3), or None."""
    owner, _, rest = module.rpartition(".")
    owner, _, param = owner.rpartition(".")
    info = experts.get(owner)
    if info is None or not rest.isdigit():
        return None
    for matrix in info.matrices:
        if matrix.param == param:
            return info, matrix, int(rest)
    return None


def quantized_linears(model: nn.Module, config) -> Dict[str, LinearInfo]:
    """Every weight we quantize: the plain linears, then each expert's matrices."""
    from .architecture import find_linears

    return {**find_linears(model, config), **expert_linears(find_experts(model))}
