"""What the planner needs to know about a model: shapes only, no weights.

Computed from a transformers config alone, so a user can plan before downloading a
65 GB checkpoint. The linear shapes come from the same empty skeleton the converter
and the runtime use. Reading a quantized directory's manifest is the planner's job
(:mod:`offload_engine.planning.describe`), one stage up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from ..errors import FormatError
from ..quant.layout import QuantSpec
from . import architecture
from .experts import find_experts


@dataclass(frozen=True)
class LinearShape:
    """One quantized linear, in execution order."""

    name: str  # module name, e.g. "model.layers.0.mlp.up_proj"
    out_features: int
    in_features: int
    is_lm_head: bool
    # its own spec when a quantized directory mixes them (a GGUF Q4_K_M import); None: the
    # model's (ModelShape.spec)
    spec: Optional[QuantSpec] = None


@dataclass(frozen=True)
class ExpertsShape:
    """The mixture-of-experts layers: each expert's matrices are quantized like linears."""

    layers: List[str]  # experts module names, in execution order
    num_experts: int  # routed experts per layer
    experts_per_token: int  # the router's top-k
    matrices: List[Tuple[int, int]]  # (out_features, in_features) of one expert's matrices

    @property
    def params_per_expert(self) -> int:
        return sum(out * inp for out, inp in self.matrices)

    @property
    def total_params(self) -> int:
        return len(self.layers) * self.num_experts * self.params_per_expert

    @property
    def active_params(self) -> int:
        """Expert parameters one token uses: top-k experts in every experts layer."""
        return len(self.layers) * self.experts_per_token * self.params_per_expert


@dataclass
class ModelShape:
    """What the planner needs to know about a model: shapes only, no weights."""

    source: str  # the path planned
    model_type: str  # e.g. "qwen2"
    spec: QuantSpec  # the directory's scheme, or the one asked for
    quantized: bool  # True for a directory written by `quantize`
    linears: List[LinearShape]  # every quantized linear, in execution order
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    kv_heads: int
    head_dim: int
    max_positions: Optional[int]  # max_position_embeddings, when the config gives it
    tied_embeddings: bool  # lm_head shares the (dense) embedding
    other_dense_elements: int  # norms, biases... kept dense besides the embedding
    host_dense_bytes: int  # embedding + other dense tensors as stored on the host
    decode_ops_per_step: Optional[int] = None  # aten ops of one eager decode step (counted)
    experts: Optional[ExpertsShape] = None  # mixture-of-experts models only

    @property
    def embedding_elements(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        """Every parameter: linears, experts, embeddings (a tied lm_head once), the rest."""
        linears = sum(lin.out_features * lin.in_features for lin in self.linears)
        experts = self.experts.total_params if self.experts else 0
        return linears + experts + self.embedding_elements + self.other_dense_elements

    @property
    def active_params(self) -> int:
        """Parameters one token reads (the token's embedding row counted as the table)."""
        if self.experts is None:
            return self.total_params
        return self.total_params - self.experts.total_params + self.experts.active_params

    def spec_of(self, linear: LinearShape) -> QuantSpec:
        return linear.spec or self.spec


def shape_from_config(hf_config, spec: QuantSpec, source: str, quantized: bool = False,
                      host_dense_bytes: Optional[int] = None) -> ModelShape:
    """Shapes of the model ``hf_config`` describes, planned as ``spec``.

    ``host_dense_bytes`` is the size of the dense tensors as stored, when known (a
    quantized directory's manifest says); otherwise it is counted at the config's dtype.
    """
    text = architecture.text_config(hf_config)
    model = architecture.build_skeleton(hf_config)
    found = architecture.find_linears(model, hf_config)
    linears = [LinearShape(n, i.out_features, i.in_features, i.is_lm_head)
               for n, i in found.items()]
    embedding = model.get_input_embeddings().weight
    # The skeleton is not tied yet: a tied lm_head still has its own meta weight.
    embeddings = {id(embedding), id(model.get_output_embeddings().weight)}
    experts = find_experts(model)
    weight_names = ({f"{name}.weight" for name in found}
                    | {f"{name}.{m.param}" for name, info in experts.items()
                       for m in info.matrices})
    other = sum(p.numel() for name, p in model.named_parameters()
                if name not in weight_names and id(p) not in embeddings)
    if host_dense_bytes is None:
        source_dtype = getattr(text, "dtype", None)  # transformers 5 renamed torch_dtype
        itemsize = source_dtype.itemsize if isinstance(source_dtype, torch.dtype) else 2
        host_dense_bytes = (embedding.numel() + other) * itemsize
    return ModelShape(
        source=source, model_type=str(getattr(hf_config, "model_type", "?")), spec=spec,
        quantized=quantized, linears=linears,
        vocab_size=embedding.shape[0], hidden_size=embedding.shape[1],
        intermediate_size=int(getattr(text, "intermediate_size", 4 * embedding.shape[1])),
        num_layers=text.num_hidden_layers,
        kv_heads=architecture.attention_dims(text)[0],
        head_dim=architecture.attention_dims(text)[1],  # the largest, when layers differ
        max_positions=getattr(text, "max_position_embeddings", None),
        tied_embeddings=architecture.ties_embeddings(hf_config),
        other_dense_elements=other, host_dense_bytes=host_dense_bytes,
        experts=_experts_shape(experts, text),
    )


def _experts_shape(experts: dict, text) -> Optional[ExpertsShape]:
    if not experts:
        return None
    first = next(iter(experts.values()))
    if any(info.num_experts != first.num_experts or info.matrices != first.matrices
           for info in experts.values()):
        raise FormatError("experts layers of different shapes are not supported")
    top_k = getattr(text, "num_experts_per_tok", None) or getattr(text, "moe_topk", None)
    if not top_k:
        raise FormatError(f"{getattr(text, 'model_type', '?')}: the config names no "
                          "num_experts_per_tok; this mixture-of-experts model is not supported")
    return ExpertsShape(list(experts), first.num_experts, int(top_k),
                        [(m.out_features, m.in_features) for m in first.matrices])
