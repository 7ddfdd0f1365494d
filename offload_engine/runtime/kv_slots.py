"""A static-shape KV cache of fixed sequence slots, for the server's compiled decode step.

runtime/kv_static.py's caches hold one batch that starts and grows together: one write
position for every row. The server (``serve --compile``) decodes requests that join and
leave at any step, each at its own length. This cache holds ``slots`` rows of ``tokens``
positions each, and a (slots,) tensor of write positions, one per slot: a decode step
writes each row's new key and value at its slot's position with ``scatter_`` (positions
a tensor, never Python ints, so no guard changes from step to step) and attention reads
the whole bucket under a mask built from the same positions. A slot's first ``length``
positions are filled by copying a prefilled row in (:meth:`SlotKVCache.load`), so
every tensor the compiled step sees keeps its shape while requests come and go. A step
over the first few slots only runs on a view (:meth:`SlotKVCache.view`) sharing the
storage.

``bf16`` (the compute dtype) stores keys and values; ``int8``/``k8v4``/``int4`` store the
codes, scales and minimums of runtime/kv_cache.py's layout (quant/kv.py) and hand
attention the whole bucket dequantized, as kv_static.py's StaticQuantizedKVCache does.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer

from ..planning.kv_sizes import KVLayout
from ..quant.kv import dequantize_kv, quantize_kv
from .kv_cache import SIDES, QuantizedKVLayer


def _mark_static(tensors) -> None:
    """Fixed addresses: inductor keeps them as buffers; CUDA graphs need no copy."""
    if not torch.compiler.is_compiling():
        for tensor in tensors:
            torch._dynamo.mark_static_address(tensor)


class SlotLayer(StaticLayer):
    """One layer's K and V (or their quantized parts) for every slot, written per slot."""

    def __init__(self, layout: KVLayout, positions: torch.Tensor, tokens: int,
                 dtype: torch.dtype):
        super().__init__(tokens)
        self.layout, self.positions = layout, positions  # (S,) long, shared by all layers
        self.device, self.dtype = positions.device, dtype
        self.batch_size, self.num_heads = positions.shape[0], layout.kv_heads
        shape = (self.batch_size, layout.kv_heads, tokens)
        if layout.quantized:
            self.parts: Dict[str, Tuple[torch.Tensor, ...]] = {side: tuple(
                torch.zeros((*shape, width), dtype=kind, device=self.device)
                for width, kind in ((layout.code_bytes_of(side), torch.uint8),
                                    (layout.groups, torch.float16),
                                    (layout.groups, torch.float16)))
                for side in SIDES}  # (S, H, T, width) each
        else:
            self.parts = {side: (torch.zeros((*shape, layout.head_dim), dtype=dtype,
                                             device=self.device),)  # (S, H, T, D)
                          for side in SIDES}
        _mark_static(t for part in self.parts.values() for t in part)
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocated in __init__: the slots' shapes are known before any forward."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
        """Write one new token per slot at its position; return the whole bucket."""
        index = self.positions.view(-1, 1, 1, 1)  # (S, 1, 1, 1)
        for side, states in zip(SIDES, (key_states, value_states), strict=True):  # (S,H,1,D)
            new = (quantize_kv(states, self.layout.bits_of(side), self.layout.group_size)
                   if self.layout.quantized else (states,))
            for stored, part in zip(self.parts[side], new, strict=True):
                stored.scatter_(2, index.expand(*part.shape[:2], 1, part.shape[3]), part)
        return self._read("keys"), self._read("values")

    def _read(self, side: str) -> torch.Tensor:
        if not self.layout.quantized:
            return self.parts[side][0]
        codes, scale, minimum = self.parts[side]
        out = torch.empty((*codes.shape[:3], self.layout.head_dim), dtype=self.dtype,
                          device=self.device)  # (S, H, T, D)
        return dequantize_kv(codes, scale, minimum, self.layout.bits_of(side),
                             self.layout.group_size, out)

    def load(self, slot: int, source, row: int, length: int) -> None:
        """Copy the last ``length`` columns of ``row`` of a prefilled layer into ``slot``.

        ``source`` is a DynamicLayer (keys, values) or a QuantizedKVLayer (the same codes,
        scales and minimums as here: copied exactly, not re-quantized)."""
        if isinstance(source, QuantizedKVLayer):
            end = source.length
            given = {side: tuple(t[row, :, end - length:end] for t in source.parts[side])
                     for side in SIDES}
        else:
            given = {"keys": (source.keys[row, :, -length:],),
                     "values": (source.values[row, :, -length:],)}
        for side in SIDES:
            for stored, part in zip(self.parts[side], given[side], strict=True):
                stored[slot, :, :length] = part

    def copy_from(self, other: SlotLayer) -> None:
        """Take every slot's columns from a smaller bucket (growing the cache)."""
        held = other.max_cache_len
        for side in SIDES:
            for mine, theirs in zip(self.parts[side], other.parts[side], strict=True):
                mine[:, :, :held] = theirs

    def view(self, positions: torch.Tensor) -> SlotLayer:
        """This layer's first ``len(positions)`` slots, sharing its storage."""
        rows = positions.shape[0]
        view = SlotLayer.__new__(SlotLayer)
        StaticLayer.__init__(view, self.max_cache_len)
        view.layout, view.positions, view.device, view.dtype = (self.layout, positions,
                                                                self.device, self.dtype)
        view.batch_size, view.num_heads = rows, self.num_heads
        view.parts = {side: tuple(t[:rows] for t in part) for side, part in self.parts.items()}
        _mark_static(t for part in view.parts.values() for t in part)
        view.is_initialized = True
        return view

    def get_seq_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        self.positions.zero_()


class SlotKVCache(Cache):
    """``slots`` sequences of ``tokens`` positions each, one SlotLayer per decoder layer;
    ``positions[s]`` is where slot ``s`` writes its next token."""

    def __init__(self, layout: KVLayout, slots: int, tokens: int, dtype: torch.dtype,
                 device: torch.device):
        self.layout, self.tokens = layout, tokens
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)  # (S,)
        _mark_static([self.positions])
        super().__init__(layers=[SlotLayer(layout, self.positions, tokens, dtype)
                                 for _ in range(layout.num_layers)])

    @property
    def slots(self) -> int:
        return self.positions.shape[0]

    def load(self, slot: int, prefilled: Cache, row: int, length: int) -> None:
        """Fill ``slot`` with ``row`` of a prefilled (left-padded) cache: its last
        ``length`` columns, the row's real tokens, go to positions 0..length-1."""
        for mine, theirs in zip(self.layers, prefilled.layers, strict=True):
            if not isinstance(theirs, (DynamicLayer, QuantizedKVLayer)):
                raise TypeError(f"cannot load a {type(theirs).__name__} into a slot")
            mine.load(slot, theirs, row, length)
        self.positions[slot] = length

    def view(self, slots: int) -> SlotKVCache:
        """The first ``slots`` slots, sharing this cache's storage and positions: a step
        over fewer slots writes where a step over all of them would."""
        if slots == self.slots:
            return self
        view = SlotKVCache.__new__(SlotKVCache)
        view.layout, view.tokens = self.layout, self.tokens
        view.positions = self.positions[:slots]
        _mark_static([view.positions])
        Cache.__init__(view, layers=[layer.view(view.positions) for layer in self.layers])
        return view

    def grown(self, tokens: int) -> SlotKVCache:
        """A cache of ``tokens`` positions per slot holding this one's slots and positions."""
        first = self.layers[0]
        bigger = SlotKVCache(self.layout, self.slots, tokens, first.dtype, first.device)
        for mine, theirs in zip(bigger.layers, self.layers, strict=True):
            mine.copy_from(theirs)
        bigger.positions.copy_(self.positions)
        return bigger

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers
                   for part in layer.parts.values() for t in part)


def attention_mask(positions: torch.Tensor, tokens: int, implementation: str,
                   dtype: torch.dtype) -> torch.Tensor:
    """The 4-D mask of one decode step: slot ``s`` sees positions 0..positions[s] (its own
    tokens and the one being written), as booleans for sdpa, additive for eager."""
    seen = torch.arange(tokens, device=positions.device)[None, :] <= positions[:, None]  # (S,T)
    seen = seen[:, None, None, :]  # (S, 1, 1, T)
    if implementation == "eager":
        return torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill(
            ~seen, torch.finfo(dtype).min)
    return seen


SUPPORTED_ATTENTION: List[str] = ["sdpa", "eager"]  # the mask formats attention_mask builds
