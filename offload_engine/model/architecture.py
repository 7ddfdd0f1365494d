"""What a transformers model looks like, learned from an empty skeleton.

Both the converter (which tensors to quantize) and the runtime (which modules to
swap) ask this module, so they cannot disagree about what counts as a linear.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import FormatError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearInfo:
    """One nn.Linear of the model, by module name."""

    module_name: str  # e.g. "model.layers.0.mlp.up_proj"
    in_features: int
    out_features: int
    has_bias: bool
    is_lm_head: bool
    is_expert: bool = False  # one expert's matrix of a fused experts parameter


def text_config(config):
    """The decoder's config (multimodal configs nest it)."""
    getter = getattr(config, "get_text_config", None)
    return getter() if getter is not None else config


def layer_values(text, name: str, default=None) -> list:
    """One value per decoder layer of an attribute that may vary by layer.

    transformers 5 configs can be heterogeneous (Gemma 4: a larger ``head_dim`` on its
    full-attention layers) and then refuse the global read; each layer's config has it.
    """
    if name in (getattr(text, "per_layer_attributes", None) or ()):
        return [getattr(layer, name, None) or default for layer in text.per_layer_config]
    return [getattr(text, name, None) or default] * text.num_hidden_layers


def attention_dims(text) -> tuple:
    """(kv_heads, head_dim) per layer, each the largest over the layers, and whether they
    vary: sizing the KV cache with the largest is an upper bound."""
    heads = layer_values(text, "num_attention_heads")
    kv = [k or h for k, h in zip(layer_values(text, "num_key_value_heads"), heads,
                                 strict=True)]
    dims = [d or text.hidden_size // h for d, h in zip(layer_values(text, "head_dim"), heads,
                                                       strict=True)]
    return max(kv), max(dims), len(set(kv)) > 1 or len(set(dims)) > 1


def ties_embeddings(config) -> bool:
    return bool(getattr(text_config(config), "tie_word_embeddings", False)) or bool(
        getattr(config, "tie_word_embeddings", False)
    )


def build_skeleton(config) -> nn.Module:
    """A causal-LM skeleton with parameters on meta and computed buffers (rotary) real.

    accelerate's init_empty_weights puts only parameters on meta; a bare
    ``torch.device("meta")`` context would also put the rotary ``inv_freq`` there,
    and those are computed at init, not stored in checkpoints. But init_empty_weights
    moves a parameter to meta only after its module created it on the CPU: a layer's
    fused experts tensor of DeepSeek-V3 is 30 GB in float32. So while the skeleton is
    built, any tensor factory call of at least LARGE_ELEMENTS elements makes a meta
    tensor from the start; the buffers computed at init are far smaller.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None) is None:
        raise FormatError(
            f"model type {getattr(config, 'model_type', '?')!r} ({type(config).__name__}) has no "
            "causal language model class in transformers; offload-engine runs decoder-only "
            "text generation models")
    with init_empty_weights(), _LargeTensorsOnMeta():
        return AutoModelForCausalLM.from_config(config)


LARGE_ELEMENTS = 1 << 22  # 16 MiB in float32: larger factory tensors start on meta


class _LargeTensorsOnMeta(TorchFunctionMode):
    FACTORIES = (torch.empty, torch.zeros, torch.ones, torch.full, torch.randn, torch.rand)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self.FACTORIES and kwargs.get("device") is None:
            size = args[0] if args and not isinstance(args[0], int) else args
            if func is torch.full:
                size = args[0]
            numel = 1
            for dim in size:
                numel *= int(dim)
            if numel >= LARGE_ELEMENTS:
                kwargs["device"] = "meta"
        return func(*args, **kwargs)


def supported_attention(config) -> tuple:
    """The attention implementations transformers accepts for this model, best first.

    Some models refuse sdpa (Gemma 2's soft-capping, gpt-oss's sinks) and raise when it
    is chosen; the class says so in ``_supports_sdpa`` / ``_supports_flash_attn``.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_class is None:
        return ("flash_attention_2", "sdpa", "eager")
    return tuple(name for name, flag in (("flash_attention_2", "_supports_flash_attn"),
                                         ("sdpa", "_supports_sdpa"))
                 if getattr(model_class, flag, False)) + ("eager",)


def find_linears(model: nn.Module, config) -> Dict[str, LinearInfo]:
    """Every nn.Linear whose weight we quantize, keyed by module name, in module order.

    The output projection is left out when it is tied to the input embedding: it
    shares that dense tensor.
    """
    output = model.get_output_embeddings()
    tied = ties_embeddings(config)
    found = {}
    for name, module in model.named_modules():
        if not is_plain_linear(module):
            continue
        is_lm_head = module is output
        if is_lm_head and tied:
            continue
        found[name] = LinearInfo(
            module_name=name,
            in_features=module.in_features,
            out_features=module.out_features,
            has_bias=module.bias is not None,
            is_lm_head=is_lm_head,
        )
    return found


def is_plain_linear(module: nn.Module) -> bool:
    """An nn.Linear that computes a linear map and nothing else.

    Routers of some MoE models (Llama 4, PhiMoE) subclass nn.Linear and do top-k
    selection in their forward: they stay dense (tiny and precision-sensitive) and are
    never swapped.
    """
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def dense_role(model: nn.Module, tensor_name: str) -> str:
    """Role of a tensor that stays dense: embedding, bias, norm or other."""
    embedding = model.get_input_embeddings()
    for name, param in model.named_parameters():
        if name == tensor_name and param is embedding.weight:
            return "embedding"
    if tensor_name.endswith(".bias"):
        return "bias"
    if "norm" in tensor_name.rsplit(".", 2)[-2].lower():
        return "norm"
    return "other"


def assert_nothing_on_meta(model: nn.Module) -> None:
    """A forward with a meta tensor returns garbage instead of raising: refuse it here."""
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.device == torch.device("meta")]
    if left:
        raise FormatError(
            f"the checkpoint lacks tensors the model needs (still on meta: {left[:5]}); "
            "re-convert the model from a complete source"
        )
