"""Turn a stock transformers model into one whose linears read from the cache.

The skeleton is built with parameters on meta, every quantized nn.Linear is
swapped for :class:`OffloadedLinear` (a real subclass found by walking
``named_children``), and the dense tensors are assigned in place: no
full-precision linear weight is ever materialised.
"""

from __future__ import annotations

import logging
from typing import Dict, Iterable, Tuple

import torch
from torch import nn

from . import architecture
from .errors import FormatError
from .linear import OffloadedLinear

logger = logging.getLogger(__name__)


def swap_linears(module: nn.Module, linears: Dict[str, architecture.LinearInfo],
                 prefix: str = "") -> Dict[str, OffloadedLinear]:
    """Replace every nn.Linear named in ``linears`` (module names) in place."""
    swapped = {}
    for child_name, child in list(module.named_children()):
        full = f"{prefix}{child_name}"
        info = linears.get(full)
        if info is not None and isinstance(child, nn.Linear):
            replacement = OffloadedLinear(full, info.in_features, info.out_features, info.has_bias)
            setattr(module, child_name, replacement)
            swapped[full] = replacement
        else:
            swapped.update(swap_linears(child, linears, prefix=f"{full}."))
    return swapped


def load_dense(model: nn.Module, tensors: Iterable[Tuple[str, torch.Tensor]],
               device: torch.device, dtype: torch.dtype) -> None:
    """Assign every dense tensor (embeddings, norms, biases) onto ``device``."""
    state = {}
    for name, tensor in tensors:
        state[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise FormatError(f"the checkpoint has tensors this model does not: "
                          f"{result.unexpected_keys[:5]}; is the config.json the right one?")
    model.tie_weights()
    for name, buffer in model.named_buffers():
        if buffer.device != device:
            _set_buffer(model, name, buffer.to(device))
    for param in model.parameters():
        param.requires_grad_(False)
    architecture.assert_nothing_on_meta(model)


def _set_buffer(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    persistent = leaf not in getattr(owner, "_non_persistent_buffers_set", set())
    owner.register_buffer(leaf, value, persistent=persistent)
