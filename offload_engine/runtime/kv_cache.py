"""The int8/int4 KV cache: a transformers Cache whose layers store quantized K and V.

Why not transformers' own ``QuantizedCache``: its integer backends need optional packages
(optimum-quanto or hqq); it quantizes per channel, not per token and head; it keeps a
float residual and re-quantizes the whole history from dequantized values every time
that residual fills (rounding errors compound, and the work grows with the context);
and it grows by concatenation, with no bound. This cache quantizes each new token once
(per token and KV head, a float16 scale and minimum per group of the head dim, see
quant/kv.py), appends the codes into storage that grows in chunks of KV_CHUNK_TOKENS
within a byte budget, and hands attention the whole layer dequantized into one scratch
buffer shared by all layers. No float residual window is kept: the measurements in
docs/quality.md did not call for one.

The stock model and ``generate`` use it as any Cache, passed by ``model.cache_arg.cache_kwargs``.
Sizes come from planning/kv_sizes.py, so the planner's figures are the bytes held here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from transformers.cache_utils import Cache, DynamicLayer, get_layer_types_and_kwargs

from ..errors import ConfigError, ContextLengthError
from ..model.architecture import attention_dims
from ..planning.kv_sizes import KV_CHUNK_TOKENS, KVLayout
from ..quant.kv import dequantize_kv, quantize_kv
from ..units import format_bytes

SIDES = ("keys", "values")


@dataclass
class KVCounters:
    """Bytes the cache moved, for GenerationStats and bench (plain numbers)."""

    read_bytes: int = 0  # quantized storage read to dequantize layers for attention
    written_bytes: int = 0  # quantized storage written for new tokens
    updates: int = 0  # layer updates (one per layer per forward pass)


class KVScratch:
    """One layer's dequantized K and V, shared by every layer of a cache.

    Attention consumes a layer's keys and values before the next layer's update, so
    one buffer per side serves them all: the dense bytes on the device are one layer's.
    """

    def __init__(self) -> None:
        self.buffers: Dict[str, torch.Tensor] = {}

    def view(self, side: str, like: torch.Tensor, batch: int, heads: int, tokens: int,
             capacity: int, head_dim: int) -> torch.Tensor:
        buffer = self.buffers.get(side)
        if (buffer is None or buffer.shape[0] != batch or buffer.shape[2] < capacity
                or buffer.dtype != like.dtype or buffer.device != like.device):
            buffer = torch.empty((batch, heads, capacity, head_dim), dtype=like.dtype,
                                 device=like.device)
            self.buffers[side] = buffer
        return buffer[:, :, :tokens]  # (B, H, T, D)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


class QuantizedKVLayer(DynamicLayer):
    """K and V of one attention layer, stored as codes + float16 scale and minimum."""

    is_croppable = True

    def __init__(self, layout: KVLayout, scratch: KVScratch, counters: KVCounters,
                 max_tokens: Optional[int], budget: Optional[int]):
        super().__init__()
        self.layout, self.scratch, self.counters = layout, scratch, counters
        self.max_tokens, self.budget = max_tokens, budget  # tokens per sequence, bytes
        self.length = 0  # tokens held
        self.capacity = 0  # tokens allocated
        self.parts: Dict[str, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch = key_states.shape[0]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
        """Quantize and append the new tokens; return the whole layer dequantized."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        self._reserve(end)
        for side, states in zip(SIDES, (key_states, value_states), strict=True):
            new = quantize_kv(states, self.layout.bits_of(side), self.layout.group_size)
            for stored, part in zip(self.parts[side], new, strict=True):
                stored[:, :, start:end] = part
        self.length = end
        per_token = self.batch * self.layout.layer_token_bytes()
        self.counters.written_bytes += (end - start) * per_token
        self.counters.read_bytes += end * per_token
        self.counters.updates += 1
        return self._dequantized("keys", key_states), self._dequantized("values", value_states)

    def _dequantized(self, side: str, like: torch.Tensor) -> torch.Tensor:
        codes, scale, minimum = self.parts[side]
        layout = self.layout
        out = self.scratch.view(side, like, self.batch, codes.shape[1], self.length,
                                self.capacity, layout.head_dim)
        return dequantize_kv(codes[:, :, :self.length], scale[:, :, :self.length],
                             minimum[:, :, :self.length], layout.bits_of(side),
                             layout.group_size, out)

    def _reserve(self, tokens: int) -> None:
        """Make room for ``tokens`` per sequence: grow by whole chunks, never past the budget."""
        if tokens <= self.capacity:
            return
        if self.max_tokens is not None and tokens > self.max_tokens:
            raise ContextLengthError(over_budget_message(self.layout, tokens, self.batch,
                                                         self.budget))
        capacity = -(-tokens // KV_CHUNK_TOKENS) * KV_CHUNK_TOKENS
        if self.max_tokens is not None:
            capacity = min(capacity, self.max_tokens)
        self.parts = {side: self._grown(side, capacity) for side in SIDES}
        self.capacity = capacity

    def _grown(self, side: str, capacity: int):
        layout, heads, old = self.layout, self.layout.kv_heads, self.parts.get(side)
        shapes = ((layout.code_bytes_of(side), torch.uint8), (layout.groups, torch.float16),
                  (layout.groups, torch.float16))
        grown = tuple(torch.empty((self.batch, heads, capacity, width), dtype=dtype,
                                  device=self.device) for width, dtype in shapes)
        if old is not None:
            for new, previous in zip(grown, old, strict=True):
                new[:, :, :self.length] = previous[:, :, :self.length]
        return grown

    @property
    def nbytes(self) -> int:
        """Bytes allocated for this layer's quantized K and V (all of capacity)."""
        return sum(t.numel() * t.element_size() for part in self.parts.values() for t in part)

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1 if self.max_tokens is None else self.max_tokens

    def reset(self) -> None:
        self.length, self.capacity, self.parts = 0, 0, {}
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the newest tokens (speculative decoding rolls back this way)."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        self.length = max(0, self.length + tokens_to_remove)

    def _select(self, index: torch.Tensor) -> None:
        self.parts = {side: tuple(t.index_select(0, index.to(t.device)) for t in part)
                      for side, part in self.parts.items()}
        self.batch = len(index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._select(torch.as_tensor(indices, dtype=torch.long).reshape(-1))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select(torch.arange(self.batch).repeat_interleave(repeats))


def over_budget_message(layout: KVLayout, tokens: int, batch: int, budget: Optional[int]) -> str:
    fits = layout.max_tokens(budget, batch) if budget is not None else 0
    return (f"a context of {tokens} tokens x {batch} sequence(s) needs "
            f"{format_bytes(layout.cache_bytes(tokens, batch))} of --kv-cache {layout.mode} "
            f"({layout.token_bytes()} bytes per token plus one layer's dequantized scratch), "
            f"over the KV budget of {format_bytes(budget or 0)}, which holds {fits} tokens; "
            "shorten the prompt or --max-new-tokens, raise --kv-budget, or use a smaller "
            "--kv-cache (int8, int4)")


class QuantizedKVCache(Cache):
    """A transformers Cache of QuantizedKVLayer, one per decoder layer."""

    def __init__(self, layout: KVLayout, budget: Optional[int] = None, batch: int = 1):
        if not layout.quantized:
            raise ConfigError(f"QuantizedKVCache needs --kv-cache int8, k8v4 or int4, not "
                              f"{layout.mode}")
        self.layout, self.budget = layout, budget
        self.counters, self.scratch = KVCounters(), KVScratch()
        max_tokens = None if budget is None else layout.max_tokens(budget, batch)
        super().__init__(layers=[QuantizedKVLayer(layout, self.scratch, self.counters,
                                                  max_tokens, budget)
                                 for _ in range(layout.num_layers)])

    @property
    def nbytes(self) -> int:
        """Device bytes held now: quantized storage of every layer plus the shared scratch."""
        return sum(layer.nbytes for layer in self.layers) + self.scratch.nbytes


def kv_layout_from_config(hf_config, mode: str, dtype: torch.dtype) -> KVLayout:
    """The KV layout of a transformers config; refuses models with other attention kinds."""
    text = hf_config.get_text_config(decoder=True)
    layer_types, _ = get_layer_types_and_kwargs(text)
    odd = sorted(set(layer_types) - {"full_attention"})
    if odd and mode != "bf16":
        raise ConfigError(f"--kv-cache {mode} supports full-attention layers only; this model "
                          f"has {', '.join(odd)} layers: use --kv-cache bf16")
    kv_heads, head_dim, varies = attention_dims(text)
    if varies and mode != "bf16":
        raise ConfigError(f"--kv-cache {mode} needs one head shape for every layer; this model's "
                          "head_dim or KV heads vary by layer: use --kv-cache bf16")
    return KVLayout(mode, text.num_hidden_layers, kv_heads, head_dim, dtype.itemsize)


def new_kv_cache(layout: KVLayout, budget: Optional[int] = None,
                 batch: int = 1) -> Optional[QuantizedKVCache]:
    """A fresh cache for one generate call; None for bf16 (transformers' DynamicCache)."""
    if not layout.quantized:
        return None
    return QuantizedKVCache(layout, budget, batch)


def check_kv_budget(layout: KVLayout, tokens: int, batch: int, budget: Optional[int]) -> None:
    """Refuse, before any work, a context whose KV cache would not fit ``budget`` bytes."""
    if budget is not None and layout.cache_bytes(tokens, batch) > budget:
        raise ContextLengthError(over_budget_message(layout, tokens, batch, budget))
