"""What the planner needs to know about a model: shapes only, no weights.

Computed from a transformers config alone, so a user can plan before downloading a
65 GB checkpoint. The linear shapes come from the same empty skeleton the converter
and the runtime use. Reading a quantized directory's manifest is the planner's job
(:mod:`offload_engine.planning.describe`), one stage up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from ..quant.layout import QuantSpec
from . import architecture


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

    @property
    def embedding_elements(self) -> int:
        return self.vocab_size * self.hidden_size

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
    weight_names = {f"{name}.weight" for name in found}
    other = sum(p.numel() for name, p in model.named_parameters()
                if name not in weight_names and id(p) not in embeddings)
    heads = text.num_attention_heads
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
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        max_positions=getattr(text, "max_position_embeddings", None),
        tied_embeddings=architecture.ties_embeddings(hf_config),
        other_dense_elements=other, host_dense_bytes=host_dense_bytes,
    )
