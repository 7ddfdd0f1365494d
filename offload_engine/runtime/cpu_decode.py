"""Leaner forwards for the Llama family's norms, MLPs and attention where they run on a CPU.

At batch 1 the weights are not what makes a CPU decode step slow: transformers' eager code
around them is (tools/step_breakdown.py). This module gives each RMSNorm, SiLU MLP and
attention module of a Llama or Qwen2 model a forward that calls one C++ step
(kernels/cpu_decode.py) where the stock code issues several torch ops:

- RMSNorm: one call, any number of rows;
- MLP: ``down(silu_mul(gate(x), up(x)))``, one call for the gate;
- attention, for one query token a row (the decode step; a padded batch's boolean SDPA
  mask is honoured by skipping the masked keys, so a row equals itself alone): the rotary
  embedding in one call per side, the cache update as before, attention in one call
  instead of transformers' SDPA dispatch.

A decoder layer whose seven weights stay resident runs its batch-1 decode step in two
C++ calls (:class:`ResidentLayer`), with the same ops as the per-module steps.

Everything else (prefill attention, --compile tracing, tensors on a GPU, float32, eager
attention) runs the stock forward, which the new one keeps and falls back to. The linears
are still the model's modules (OffloadedLinear), so the cache, the CPU placement and their
counters see every weight use as before. The steps round where the stock code rounds, so
logits match it up to the order of float32 sums (tests/test_cpu_decode.py).
"""

from __future__ import annotations

import logging
import types
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu_decode, cpu_int4, gateway
from .ranges import profiled_now

logger = logging.getLogger(__name__)

PART_CLASSES = {  # transformers class names whose forwards this module knows
    "norm": ("LlamaRMSNorm", "Qwen2RMSNorm"),
    "mlp": ("LlamaMLP", "Qwen2MLP"),
    "attention": ("LlamaAttention", "Qwen2Attention"),
}
# bfloat16 only (the CPU default for int4): in float32 the exactness tests hold logits to
# transformers' within 1e-5, which the order of a float32 sum already exceeds
DTYPES = (torch.bfloat16,)
LAYER_CLASSES = ("LlamaDecoderLayer", "Qwen2DecoderLayer")
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj")
REST_LINEARS = ("o_proj", "gate_proj", "up_proj", "down_proj")


def install(model: nn.Module, device: torch.device, placed_parts=()) -> int:
    """Give the known modules their CPU forward: every one when ``device`` is the CPU,
    else those inside ``placed_parts`` (the CPU-computed parts beside a GPU). Returns how
    many were changed (0 where the C++ steps cannot be built or are turned off)."""
    if not cpu_decode.enabled():
        return 0
    roots = [model] if device.type == "cpu" else [part.inner for part in placed_parts]
    targets = [(kind, module) for root in roots for module in root.modules()
               for kind, names in PART_CLASSES.items()
               if type(module).__name__ in names and _supported(kind, module)]
    if not targets or not cpu_decode.ready():
        return 0
    for kind, module in targets:
        stock = module.forward
        module.forward = types.MethodType(FORWARDS[kind](stock), module)
    fused = sum(_fuse_layer(layer) for layer in model.modules()
                if type(layer).__name__ in LAYER_CLASSES) if device.type == "cpu" else 0
    logger.debug("CPU decode steps on %d modules, %d layers in two calls", len(targets), fused)
    return len(targets)


def _supported(kind: str, module: nn.Module) -> bool:
    """SiLU MLPs only (the C++ gate is SiLU's), attention without a sliding window."""
    if kind == "mlp":
        return getattr(module.config, "hidden_act", None) in ("silu", "swish")
    if kind == "attention":
        return getattr(module, "sliding_window", None) is None
    return True


def _on_cpu(x: torch.Tensor) -> bool:
    return (not torch.compiler.is_compiling() and x.device.type == "cpu"
            and x.dtype in DTYPES and cpu_decode.enabled())


def _norm_forward(stock: Callable) -> Callable:
    def forward(self, hidden_states):
        if _on_cpu(hidden_states) and hidden_states.dtype == self.weight.dtype:
            return cpu_decode.rms_norm(hidden_states, self.weight, self.variance_epsilon)
        return stock(hidden_states)
    return forward


def _mlp_forward(stock: Callable) -> Callable:
    def forward(self, x):
        if _on_cpu(x):
            return self.down_proj(cpu_decode.silu_mul(self.gate_proj(x), self.up_proj(x)))
        return stock(x)
    return forward


def _attention_forward(stock: Callable) -> Callable:
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                cache=None, **kwargs):
        cache = kwargs.pop("past_key_values", cache)  # the name before transformers 5.2x
        if not _decodes_here(self, hidden_states, position_embeddings, attention_mask, kwargs):
            return stock(hidden_states, position_embeddings=position_embeddings,
                         attention_mask=attention_mask, cache=cache, **kwargs)
        shape = (hidden_states.shape[0], 1, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = cpu_decode.rope(query, cos, sin), cpu_decode.rope(key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        if attention_mask is not None and attention_mask.shape[-1] != key.shape[2]:
            output = F.scaled_dot_product_attention(  # a mask for another length: SDPA's
                query, key, value, attn_mask=attention_mask, scale=self.scaling,
                enable_gqa=True).transpose(1, 2).reshape(hidden_states.shape[0], 1, -1)
        else:
            output = cpu_decode.decode_attention(query, key, value, self.scaling, attention_mask)
        return self.o_proj(output), None
    return forward


def _decodes_here(module, hidden_states, position_embeddings, attention_mask, kwargs) -> bool:
    """One token a row, on the CPU, under SDPA, with no mask or SDPA's boolean one (a padded
    batch): the step the C++ attention computes. Anything else is stock."""
    return (_on_cpu(hidden_states) and hidden_states.shape[1] == 1
            and position_embeddings is not None
            and (attention_mask is None or _boolean_row_mask(attention_mask, hidden_states))
            and module.config._attn_implementation == "sdpa"
            and not module.training and not kwargs.get("output_attentions"))


def _boolean_row_mask(mask, hidden_states) -> bool:
    return (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 4
            and tuple(mask.shape[:3]) == (hidden_states.shape[0], 1, 1))


FORWARDS = {"norm": _norm_forward, "mlp": _mlp_forward, "attention": _attention_forward}


class ResidentLayer:
    """A decoder layer whose seven weights stay prepacked in memory for the cache's life:
    its decode step runs in two C++ calls (kernels/cpu_decode.py's layer_qkv, layer_rest)
    around the cache update, with the same ops as the per-module path, in the same order."""

    def __init__(self, linears: list, cache, weights: list):
        biases = [linear.bias for linear in linears]
        self.cache, self.first_weight = cache, weights[0]
        self.names = [linear.weight_name for linear in linears]
        self.qkv = cpu_decode.int4_linear_args(weights[:3], biases[:3])
        self.rest = cpu_decode.int4_linear_args(weights[3:], biases[3:])

    def takes(self, hidden: torch.Tensor) -> bool:
        """Whether the per-module path would run torch's int4 op here too (not with the
        reference forced, nor with OFFLOAD_CPU_GEMV=1's kernel), and no profiler is on."""
        return (gateway.kernel_path(hidden, self.first_weight) == gateway.CPU_INT4PACK
                and not profiled_now())

    def step(self, layer: nn.Module, hidden: torch.Tensor, cache, position_embeddings):
        attention = layer.self_attn
        cos, sin = position_embeddings
        first, second = layer.input_layernorm, layer.post_attention_layernorm
        query, key, value = cpu_decode.layer_qkv(hidden, first.weight, first.variance_epsilon,
                                                 self.qkv, cos, sin, attention.head_dim)
        if cache is not None:
            key, value = cache.update(key, value, attention.layer_idx)
        self.cache.count_uses(self.names, 1)
        return cpu_decode.layer_rest(hidden, query, key, value, attention.scaling, second.weight,
                                     second.variance_epsilon, self.rest)


def _fuse_layer(layer: nn.Module) -> bool:
    """Give ``layer`` the two-call decode step when its parts are the stock modules and all
    seven weights are resident, prepacked int4 (the bfloat16 CPU kernel's form)."""
    attention, mlp = layer.self_attn, layer.mlp
    if not (type(attention).__name__ in PART_CLASSES["attention"]
            and type(mlp).__name__ in PART_CLASSES["mlp"] and _supported("mlp", mlp)
            and _supported("attention", attention)):
        return False  # a CPU part placed beside a GPU, or a model this does not know
    # in the order both C++ calls take them: q, k, v; o, gate, up, down
    linears = [getattr(attention, n) for n in ATTENTION_LINEARS + REST_LINEARS[:1]]
    linears += [getattr(mlp, n) for n in REST_LINEARS[1:]]
    cache = getattr(linears[0], "cache", None)
    if not hasattr(cache, "permanent_weight") or any(lin.cache is not cache for lin in linears):
        return False
    weights = [cache.permanent_weight(linear.weight_name) for linear in linears]
    if not all(cpu_int4.is_prepacked(w) for w in weights):
        return False  # something streams, or a weight the int4 kernel does not read
    layer.resident_step = ResidentLayer(linears, cache, weights)  # tests, tools look
    layer.forward = types.MethodType(_layer_forward(layer.forward, layer.resident_step), layer)
    return True


def _layer_forward(stock: Callable, resident: ResidentLayer) -> Callable:
    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None,
                use_cache=False, position_embeddings=None, **kwargs):
        cache = kwargs.pop("past_key_values", cache)
        if (attention_mask is None and hidden_states.shape[0] == 1
                and _decodes_here(self.self_attn, hidden_states, position_embeddings, None,
                                  kwargs) and resident.takes(hidden_states)):
            return resident.step(self, hidden_states, cache, position_embeddings)
        # under a profiler too: there each linear keeps its own trace range
        return stock(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                     cache=cache, use_cache=use_cache, position_embeddings=position_embeddings,
                     **kwargs)
    return forward
