"""One left-padded KV cache shared by every sequence being decoded.

The prompts admitted in one step are prefilled together, left-padded to the longest
(server/prefill.py); their cache, with its padding mask, then joins the batched cache as
new rows, everything left-padded to the longest row. A decode step feeds one token per row
with position ids counted from each row's own real tokens, so a row computes what it would
compute alone. Rows leave by index, and columns that became padding in every row are
trimmed away.
With --kv-cache int8/int4/k8v4 the rows are quantized caches, joined and split the same
way by server/kvquant.py.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..errors import ConfigError
from ..model.cache_arg import cache_kwargs
from ..runtime.kv_cache import QuantizedKVCache
from . import kvquant


def check_batchable(model_config) -> None:
    """Refuse models whose cache layers are not plain growing key/value tensors."""
    layers = DynamicCache(config=model_config).layers
    odd = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if odd:
        raise ConfigError(f"the server batches full-attention models only; this model's cache "
                          f"has {', '.join(odd)} layers (sliding-window or linear attention)")


def _left_pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Pad (B, H, T, D) on the left of T with zeros up to ``length``."""
    return F.pad(tensor, (0, 0, length - tensor.shape[-2], 0))


class BatchedCache:
    """The KV cache and padding mask of the rows decoded together, in row order."""

    def __init__(self) -> None:
        self.cache: Optional[DynamicCache] = None
        self.mask: Optional[torch.Tensor] = None  # (B, T) long: 1 real token, 0 padding

    @classmethod
    def prefilled(cls, cache, mask: torch.Tensor) -> BatchedCache:
        """The rows of one padded prefill forward (``mask`` (B, T) marks their padding),
        so that rows finishing at once can leave before the rest join the running batch."""
        rows = cls()
        rows.cache, rows.mask = cache, mask
        return rows

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def width(self) -> int:
        """Columns every row spans now (0 when empty)."""
        return 0 if self.mask is None else self.mask.shape[1]

    def join_prefilled(self, cache, mask: torch.Tensor, rows: List[int],
                       needs: Optional[List[int]] = None) -> None:
        """Append ``rows`` of one padded prefill forward (``mask`` (B, T) marks their
        padding); the rows left out finished at once, and their padding is trimmed.
        ``needs`` (positions each row may reach) matters to server/slot_batch.py only."""
        prefilled = BatchedCache.prefilled(cache, mask)
        if len(rows) < mask.shape[0]:
            prefilled.keep(rows)
        self.join(prefilled.cache, prefilled.mask)

    def join(self, cache, mask: torch.Tensor) -> None:
        """Append a prefilled cache's rows as the last rows; ``mask`` (B, T) marks their own
        left padding."""
        length = cache.get_seq_length()
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        width = max(self.mask.shape[1], length)
        if isinstance(self.cache, QuantizedKVCache):
            kvquant.join_rows(self.cache, cache, width)
        else:
            self._join_dense(cache, width)
        self.mask = torch.cat([F.pad(self.mask, (width - self.mask.shape[1], 0)),
                               F.pad(mask, (width - length, 0))])

    def _join_dense(self, cache: DynamicCache, width: int) -> None:
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            mine.values = torch.cat([_left_pad(mine.values, width),
                                     _left_pad(theirs.values, width)])

    def keep(self, rows: List[int]) -> None:
        """Keep only ``rows`` (in that order); trim columns that are padding in all of them."""
        if not rows:
            self.cache = self.mask = None
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        start = int((self.mask.shape[1] - self.mask.sum(dim=1)).min())  # shortest padding
        self.mask = self.mask[:, start:]
        if isinstance(self.cache, QuantizedKVCache):
            kvquant.keep_rows(self.cache, index, start)
            return
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]

    def decode_inputs(self, last_tokens: List[int], model) -> dict:
        """``model``'s kwargs for one step feeding ``last_tokens[i]`` to row i."""
        device = self.mask.device
        input_ids = torch.tensor(last_tokens, dtype=torch.long, device=device)[:, None]  # (B, 1)
        positions = self.mask.sum(dim=1, keepdim=True)  # (B, 1): real tokens before this one
        attention_mask = torch.cat([self.mask, torch.ones_like(positions)], dim=1)  # (B, T+1)
        return dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                    use_cache=True, **cache_kwargs(model, self.cache))

    def advance(self, attention_mask: torch.Tensor) -> None:
        """After a decode step the cache grew one column; the step's mask now describes it."""
        self.mask = attention_mask

    def step(self, last_tokens: List[int], model) -> torch.Tensor:
        """One eager forward feeding ``last_tokens[i]`` to row i; the rows' next-token
        logits (B, V)."""
        inputs = self.decode_inputs(last_tokens, model)
        output = model(**inputs, logits_to_keep=1)
        self.advance(inputs["attention_mask"])
        return output.logits[:, -1]

