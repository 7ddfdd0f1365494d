"""Turn a stock transformers model into one whose linears read from the cache.

The skeleton is built with parameters on meta, every quantized nn.Linear is
swapped for :class:`OffloadedLinear` (a real subclass found by walking
``named_children``), and the dense tensors are assigned in place: no
full-precision linear weight is ever materialised.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, FormatError
from ..model import architecture
from ..model.experts import ExpertsInfo
from .boundary import wrap_parts
from .cpu_decode import install as install_cpu_decode
from .experts import OffloadedExperts, link_next_layers
from .linear import OffloadedLinear

logger = logging.getLogger(__name__)


def swap_linears(module: nn.Module, linears: Dict[str, architecture.LinearInfo],
                 prefix: str = "") -> Dict[str, OffloadedLinear]:
    """Replace every nn.Linear named in ``linears`` (module names) in place."""
    swapped = {}
    for child_name, child in list(module.named_children()):
        full = f"{prefix}{child_name}"
        info = linears.get(full)
        if info is not None and architecture.is_plain_linear(child):
            replacement = OffloadedLinear(full, info.in_features, info.out_features, info.has_bias)
            setattr(module, child_name, replacement)
            swapped[full] = replacement
        else:
            swapped.update(swap_linears(child, linears, prefix=f"{full}."))
    return swapped


def swap_experts(model: nn.Module, experts: Dict[str, ExpertsInfo], link: bool = False
                 ) -> Dict[str, OffloadedExperts]:
    """Replace every experts module named in ``experts`` in place (routers stay); with
    ``link``, give each the next one's router (the next-layer prefetch's guess)."""
    swapped = {}
    for name in experts:
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        replacement = OffloadedExperts(experts[name], getattr(owner, leaf))
        setattr(owner, leaf, replacement)
        swapped[name] = replacement
    if swapped:
        next(iter(swapped.values())).counts_tokens = True
    if link:
        link_next_layers(model, list(swapped.values()))
    return swapped


def load_dense(model: nn.Module, tensors: Iterable[Tuple[str, torch.Tensor]],
               device: torch.device, dtype: torch.dtype, host_names=frozenset()) -> None:
    """Assign every dense tensor (embeddings, norms, biases) onto ``device``.

    Tensors named in ``host_names`` stay in host memory (see :class:`HostEmbedding`).
    """
    state = {}
    for name, tensor in tensors:
        target = torch.device("cpu") if name in host_names else device
        state[name] = tensor.to(device=target, dtype=dtype if tensor.is_floating_point() else None)
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise FormatError(f"the checkpoint has tensors this model does not: "
                          f"{result.unexpected_keys[:5]}; is the config.json the right one?")
    model.tie_weights()
    if host_names:
        _host_embeddings(model, device, host_names)
    for name, buffer in model.named_buffers():
        if isinstance(model.get_submodule(name.rpartition(".")[0] or ""), HostEmbedding):
            continue
        if buffer.device != device:
            _set_buffer(model, name, buffer.to(device))
    for param in model.parameters():
        param.requires_grad_(False)
    architecture.assert_nothing_on_meta(model)


class HostEmbedding(nn.Module):
    """A token embedding whose table stays in host memory.

    A decode step looks up one row per sequence, so the table (1.56 GB in bf16 for a 32B
    model with a 152k vocabulary) need not take device memory: the rows are gathered on
    the host and only they cross to the device. The table is a buffer, not a parameter,
    so ``model.device`` (the first parameter's device) still names the compute device.
    """

    def __init__(self, weight: torch.Tensor, device: torch.device, padding_idx=None,
                 embed_scale: Optional[torch.Tensor] = None):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.output_device = device
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = weight.shape
        # Gemma's scaled embedding multiplies the rows by sqrt(hidden), rounded to the
        # compute dtype as its own forward does
        self.embed_scale = (None if embed_scale is None
                            else embed_scale.to(device=device, dtype=weight.dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(input_ids.to(self.weight.device), self.weight)  # (B, T, hidden)
        rows = rows.to(self.output_device)
        return rows if self.embed_scale is None else rows * self.embed_scale

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, on {self.weight.device}"


def _host_embeddings(model: nn.Module, device: torch.device, host_names) -> None:
    embedding = model.get_input_embeddings()
    output = model.get_output_embeddings()
    if output is not None and getattr(output, "weight", None) is embedding.weight:
        raise ConfigError("--embeddings host needs untied embeddings: this model's lm_head "
                          "shares the embedding matrix, which must then be on the device")
    host = HostEmbedding(embedding.weight.detach(), device,
                         getattr(embedding, "padding_idx", None),
                         getattr(embedding, "embed_scale", None))
    model.set_input_embeddings(host)


def _set_buffer(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    persistent = leaf not in getattr(owner, "_non_persistent_buffers_set", set())
    owner.register_buffer(leaf, value, persistent=persistent)


def place_and_finish(model: nn.Module, cpu_parts, device: torch.device, boundary,
                     directory) -> None:
    """After the weights: wrap the CPU-placed parts (runtime/boundary.py), give the Llama
    family its C++ CPU decode steps (runtime/cpu_decode.py), eval mode, and the directory's
    generation config."""
    from transformers import GenerationConfig

    install_cpu_decode(model, device, wrap_parts(model, cpu_parts, device, boundary))
    model.eval()
    if (Path(directory) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
