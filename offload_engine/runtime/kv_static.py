"""Static-shape KV caches for the compiled decode step (``--compile``).

A compiled step is specialised on its tensor shapes: a cache that grows by a token (or a
chunk) per step would recompile it. These caches hold a fixed number of tokens, chosen
from a few power-of-two buckets (:func:`static_cache_tokens`), and write each new token
at its position with ``index_copy_`` (the position a tensor, never a Python int, so no
guard changes from step to step); attention reads the whole bucket under the causal
mask. So the step compiles once per (batch size, bucket).

``bf16`` uses transformers' own StaticCache. ``int8``/``k8v4``/``int4`` use
:class:`StaticQuantizedKVCache`: the codes, scales and minimums of runtime/kv_cache.py's
layout (quant/kv.py), preallocated for the bucket and dequantized whole for attention.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from transformers.cache_utils import Cache, StaticCache, StaticLayer

from ..errors import ConfigError, ContextLengthError
from ..planning.kv_sizes import KV_CHUNK_TOKENS, KVLayout
from ..quant.kv import dequantize_kv, quantize_kv
from .kv_cache import SIDES, over_budget_message

MIN_BUCKET_TOKENS = KV_CHUNK_TOKENS  # the smallest bucket; then 512, 1024, ...


def static_cache_tokens(needed: int, limit: Optional[int] = None) -> int:
    """The bucket for a context of ``needed`` tokens: the next power of two from 256, cut
    to ``limit`` (the model's context, or what the KV budget holds) but never below
    ``needed``."""
    bucket = MIN_BUCKET_TOKENS
    while bucket < needed:
        bucket *= 2
    if limit is not None:
        bucket = max(needed, min(bucket, limit))
    return bucket


class StaticQuantizedKVLayer(StaticLayer):
    """One layer's quantized K and V for a fixed number of tokens."""

    def __init__(self, layout: KVLayout, max_cache_len: int):
        super().__init__(max_cache_len)
        self.layout = layout
        self.parts = {}

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.batch_size, self.num_heads = key_states.shape[:2]
        layout = self.layout
        for side in SIDES:
            widths = ((layout.code_bytes_of(side), torch.uint8), (layout.groups, torch.float16),
                      (layout.groups, torch.float16))
            self.parts[side] = tuple(
                torch.zeros((self.batch_size, self.num_heads, self.max_cache_len, width),
                            dtype=dtype, device=self.device)  # (B, H, T, width)
                for width, dtype in widths)
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():  # fixed addresses: no recompile, CUDA graphs
            for part in self.parts.values():
                for tensor in part:
                    torch._dynamo.mark_static_address(tensor)
            torch._dynamo.mark_static_address(self.cumulative_length)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
        """Quantize the new tokens into their positions; return the bucket dequantized."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new_tokens = key_states.shape[-2]
        positions = torch.arange(new_tokens, device=self.device) + self.cumulative_length
        self.cumulative_length.add_(new_tokens)
        for side, states in zip(SIDES, (key_states, value_states), strict=True):
            new = quantize_kv(states, self.layout.bits_of(side), self.layout.group_size)
            for stored, part in zip(self.parts[side], new, strict=True):
                stored.index_copy_(2, positions, part)
        return self._dequantized("keys"), self._dequantized("values")

    def _dequantized(self, side: str) -> torch.Tensor:
        codes, scale, minimum = self.parts[side]
        out = torch.empty((*codes.shape[:3], self.layout.head_dim), dtype=self.dtype,
                          device=self.device)  # (B, H, T, D)
        return dequantize_kv(codes, scale, minimum, self.layout.bits_of(side),
                             self.layout.group_size, out)

    def reset(self) -> None:
        self.cumulative_length.zero_()


class StaticQuantizedKVCache(Cache):
    """A transformers Cache of StaticQuantizedKVLayer, one per decoder layer."""

    def __init__(self, layout: KVLayout, max_cache_len: int):
        if not layout.quantized:
            raise ConfigError(f"StaticQuantizedKVCache needs --kv-cache int8, k8v4 or int4, "
                              f"not {layout.mode}")
        self.layout, self.max_cache_len = layout, max_cache_len
        super().__init__(layers=[StaticQuantizedKVLayer(layout, max_cache_len)
                                 for _ in range(layout.num_layers)])


def new_static_kv_cache(layout: KVLayout, hf_config, tokens: int, batch: int,
                        budget: Optional[int]):
    """A static cache for ``tokens`` per sequence (bucketed), within ``budget`` bytes."""
    limit = getattr(hf_config, "max_position_embeddings", None)
    if budget is not None:
        fits = layout.max_tokens(budget, batch)
        if fits < tokens:
            raise ContextLengthError(over_budget_message(layout, tokens, batch, budget))
        limit = fits if limit is None else min(limit, fits)
    capacity = static_cache_tokens(tokens, limit)
    if layout.quantized:
        return StaticQuantizedKVCache(layout, capacity)
    return StaticCache(config=hf_config, max_cache_len=capacity)


def static_cache_bytes(layout: KVLayout, past, batch: int) -> int:
    """Bytes a static cache holds: the whole bucket, plus a quantized one's dequantized
    layer (one layer at a time is live in the compiled step)."""
    capacity = past.layers[0].max_cache_len
    return layout.cache_bytes(capacity, batch)
