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
from .architecture import LinearInfo, text_config

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
    # True: called as experts(hidden, top_k_index, top_k_weights) after the router (the
    # use_experts_implementation classes). False: called as experts(rows) with every
    # token's input repeated per expert and pre-scaled by its routing weight, zero where
    # the router did not pick that expert (Llama 4's Llama4TextExperts).
    routed_call: bool = True

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
            found[name] = _describe_dense_call(name, module, model)
            continue
        found[name] = _describe(name, module)
    return found


def _describe_dense_call(name: str, module: nn.Module, model: nn.Module) -> ExpertsInfo:
    """An undecorated experts class called with per-expert pre-scaled rows (Llama 4)."""
    import inspect

    config = getattr(model, "config", None)
    hidden = getattr(text_config(config), "hidden_size", None) if config is not None else None
    arguments = list(inspect.signature(type(module).forward).parameters)[1:]
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    shapes_known = (gate_up is not None and down is not None and gate_up.dim() == 3
                    and down.dim() == 3 and hidden is not None)
    transposed = shapes_known and gate_up.shape[1] == hidden and gate_up.shape[2] != hidden
    straight = shapes_known and gate_up.shape[2] == hidden and gate_up.shape[1] != hidden
    if len(arguments) != 1 or not (transposed or straight) or not hasattr(module, "act_fn"):
        raise FormatError(
            f"{type(module).__name__} ({name}) holds its experts in a layout offload-engine "
            "does not run (neither a transformers use_experts_implementation class nor "
            "gate_up_proj/down_proj called on pre-routed rows); this model type "
            f"({getattr(config, 'model_type', '?')}) is not supported")
    matrices = []
    for param, tensor in (("gate_up_proj", gate_up), ("down_proj", down)):
        rows, cols = tensor.shape[1:]
        out_features, in_features = (cols, rows) if transposed else (rows, cols)
        matrices.append(ExpertMatrix(param, out_features, in_features, transposed))
    return ExpertsInfo(name, gate_up.shape[0], tuple(matrices), False, routed_call=False)


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
