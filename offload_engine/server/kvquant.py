"""Joining and splitting rows of the quantized (--kv-cache int8/int4/k8v4) batched cache.

The dense batched cache (server/kvbatch.py) left-pads and concatenates key/value tensors.
A quantized layer (runtime/kv_cache.py) instead holds, per side, codes, float16 scales and
float16 minimums of shape (B, H, capacity, width), with ``length`` columns in use. These
functions give it the same two operations: join prefilled rows left-padded to the batch's
width, and keep some rows while trimming columns that are padding in all of them.

Padding columns added by a join are zero codes with zero scale and minimum, so they
dequantize to exact zeros: the attention mask hides them, and zeros (unlike uninitialised
memory, which may hold NaN) stay harmless when multiplied by a masked-out weight of 0.
Padding columns from a padded prefill of several prompts (server/prefill.py) hold the
quantized keys and values the model computed at those positions: finite, and hidden too.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..planning.kv_sizes import KV_CHUNK_TOKENS
from ..runtime.kv_cache import QuantizedKVCache, QuantizedKVLayer


def _capacity(layer: QuantizedKVLayer, tokens: int) -> int:
    """Whole chunks for ``tokens`` columns, within the per-sequence cap of the budget."""
    capacity = -(-tokens // KV_CHUNK_TOKENS) * KV_CHUNK_TOKENS
    if layer.max_tokens is None:
        return capacity
    # admission (server/kv_capacity.py) keeps tokens within the cap; never cut real columns
    return max(tokens, min(capacity, layer.max_tokens))


def _set_cap(cache: QuantizedKVCache, rows: int) -> Optional[int]:
    """Tokens per row the --kv-budget allows at ``rows`` rows (None: no budget)."""
    cap = None if cache.budget is None else cache.layout.max_tokens(cache.budget, rows)
    for layer in cache.layers:
        layer.max_tokens = cap
    return cap


def _padded(layer: QuantizedKVLayer, width: int, capacity: int) -> dict:
    """The layer's parts with ``width`` columns in use, its own right-aligned."""
    parts = {}
    for side, part in layer.parts.items():
        grown = []
        for tensor in part:  # codes, scale, minimum: (B, H, capacity, width of one token)
            out = tensor.new_zeros((*tensor.shape[:2], capacity, tensor.shape[3]))
            out[:, :, width - layer.length:width] = tensor[:, :, :layer.length]
            grown.append(out)
        parts[side] = tuple(grown)
    return parts


def join_rows(mine: QuantizedKVCache, theirs: QuantizedKVCache, width: int) -> None:
    """Append ``theirs`` (the rows of one prefill) to ``mine``, all left-padded to ``width``."""
    rows = mine.layers[0].batch + theirs.layers[0].batch
    _set_cap(mine, rows)
    for ours, new in zip(mine.layers, theirs.layers, strict=True):
        capacity = _capacity(ours, width)
        padded_ours = _padded(ours, width, capacity)
        padded_new = _padded(new, width, capacity)
        ours.parts = {side: tuple(torch.cat([a, b]) for a, b in
                                  zip(padded_ours[side], padded_new[side], strict=True))
                      for side in padded_ours}
        ours.length, ours.capacity, ours.batch = width, capacity, rows
    mine.counters.written_bytes += theirs.counters.written_bytes
    mine.counters.read_bytes += theirs.counters.read_bytes


def keep_rows(cache: QuantizedKVCache, index: torch.Tensor, start: int) -> None:
    """Keep rows ``index`` (in that order) and drop the first ``start`` columns."""
    _set_cap(cache, len(index))
    for layer in cache.layers:
        # slice first, then select: one compact copy, so the freed columns are really freed
        layer.parts = {side: tuple(t[:, :, start:].index_select(0, index.to(t.device))
                                   for t in part) for side, part in layer.parts.items()}
        layer.length -= start
        layer.capacity -= start
        layer.batch = len(index)


def stored_bytes(cache: QuantizedKVCache) -> int:
    """Bytes of the columns in use (codes, scales, minimums), all rows and layers."""
    return sum(t[:, :, :layer.length].numel() * t.element_size()
               for layer in cache.layers for part in layer.parts.values() for t in part)
