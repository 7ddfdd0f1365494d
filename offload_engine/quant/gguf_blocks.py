"""GGUF quantization blocks mapped onto our layout exactly, as pure functions (no I/O).

A GGUF weight of shape (N, K) is stored row by row; each row is K/32 blocks of one type
(llama.cpp ``ggml-common.h``; gguf-py ``quants.py`` dequantizes them in NumPy):

- Q4_0, 18 bytes: fp16 d, then 16 bytes of nibbles; element i < 16 is the low nibble of
  byte i, element i + 16 its high nibble; value = (q - 8) * d.
- Q4_1, 20 bytes: fp16 d, fp16 m, 16 bytes of nibbles (same order); value = q * d + m.
- Q8_0, 34 bytes: fp16 d, 32 int8 q; value = q * d.

So a block is a group of 32 with an fp16 scale: Q4_0 is our ``int4`` (code - 8), Q4_1
our ``int4-min`` (code * scale + min), Q8_0 our ``int8``, all with group 32 and fp16
scales. Only the nibble order differs (ours: element 2j low, 2j + 1 high), so codes are
unpacked and packed again; no value is rounded.

K-quants (Q2_K ... Q6_K) hold 4- to 8-bit sub-block scales under a super-block fp16
scale: their effective per-group scale d * sc is a product of an fp16 and an integer that
does not in general round to an fp16, and Q5_0/Q5_1 have 5-bit codes. Those are kept as
the file's own blocks (the raw-block schemes of :mod:`.block_formats`): qweight is the
rows' bytes, copied; nothing is unpacked at import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

import numpy as np
import torch

from ..errors import QuantizationError
from . import block_formats, layout
from .layout import QuantSpec
from .quantize import QuantizedWeight

BLOCK = 32  # elements per block of Q4_0, Q4_1, Q8_0 (and Q5_0, Q5_1)
# Rows converted at once: bounds the int16/uint8 temporaries whatever the tensor size.
CHUNK_ELEMENTS = 1 << 22


def _fp16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 stored at bytes [start, start + 2) of every block: (rows, blocks)."""
    return blocks[..., start:start + 2].contiguous().view(torch.float16).squeeze(-1)


def _nibble_codes(qs: torch.Tensor) -> torch.Tensor:
    """(rows, blocks, 16) GGUF nibble bytes -> (rows, blocks * 32) codes in element order."""
    codes = torch.cat((qs & 0x0F, qs >> 4), dim=-1)  # low nibbles are elements 0..15
    return codes.reshape(qs.shape[0], -1)


def _q4_0(blocks: torch.Tensor) -> dict:
    return {"qweight": layout.pack_int4(_nibble_codes(blocks[..., 2:])),
            "scales": _fp16(blocks, 0)}


def _q4_1(blocks: torch.Tensor) -> dict:
    return {"qweight": layout.pack_int4(_nibble_codes(blocks[..., 4:])),
            "scales": _fp16(blocks, 0), "mins": _fp16(blocks, 2)}


def _q8_0(blocks: torch.Tensor) -> dict:
    values = blocks[..., 2:].contiguous().view(torch.int8)
    return {"qweight": values.reshape(blocks.shape[0], -1), "scales": _fp16(blocks, 0)}


@dataclass(frozen=True)
class BlockType:
    """One GGUF block type we import exactly."""

    name: str  # GGML type name, e.g. "Q4_1"
    block_bytes: int  # bytes per block
    spec: QuantSpec  # what the block becomes in our layout
    to_parts: Callable[[torch.Tensor], dict]  # (rows, blocks, block_bytes) uint8 -> parts

    @property
    def block_elements(self) -> int:
        return self.spec.group_size

    @property
    def bytes_per_param(self) -> float:
        return self.block_bytes / self.block_elements


def _raw(blocks: torch.Tensor) -> dict:
    """A raw-block scheme's one component: the rows' bytes as they are."""
    return {"qweight": blocks.reshape(blocks.shape[0], -1)}


EXACT_TYPES: Dict[str, BlockType] = {
    t.name: t for t in (
        BlockType("Q4_0", 18, QuantSpec("int4", BLOCK, "fp16"), _q4_0),
        BlockType("Q4_1", 20, QuantSpec("int4-min", BLOCK, "fp16"), _q4_1),
        BlockType("Q8_0", 34, QuantSpec("int8", BLOCK, "fp16"), _q8_0),
    ) + tuple(BlockType(f.ggml_type, f.block_bytes, QuantSpec(f.scheme, f.block_elements, "fp16"),
                        _raw) for f in block_formats.FORMATS.values())
}


def import_rows(type_name: str, rows: torch.Tensor, in_features: int,
                name: str = "<tensor>") -> QuantizedWeight:
    """Our QuantizedWeight of a GGUF weight given as its raw uint8 rows (N, K/block * bytes).

    ``rows`` (a NumPy array or torch tensor) may be a view of a memory-mapped file: it is
    copied a chunk of rows at a time.
    """
    block_type = EXACT_TYPES.get(type_name)
    if block_type is None:
        raise QuantizationError(f"tensor {name!r}: GGUF type {type_name} has no exact import; "
                                f"exact types are {', '.join(EXACT_TYPES)}")
    out_features = rows.shape[0]
    n_blocks = in_features // block_type.block_elements
    expected = n_blocks * block_type.block_bytes
    if in_features % block_type.block_elements or rows.shape[1] != expected:
        raise QuantizationError(f"tensor {name!r}: {tuple(rows.shape)} bytes do not hold "
                                f"{in_features} {type_name} elements per row; is the file "
                                "truncated or damaged?")
    step = max(1, CHUNK_ELEMENTS // in_features)
    chunks = [block_type.to_parts(_copied(rows[start:start + step]).reshape(
                  -1, n_blocks, block_type.block_bytes))
              for start in range(0, out_features, step)]
    parts = {key: torch.cat([chunk[key] for chunk in chunks]) for key in chunks[0]}
    return QuantizedWeight.from_parts(parts, block_type.spec, out_features, in_features)


def _copied(rows) -> torch.Tensor:
    """A private uint8 copy (memory maps are read-only, and torch wants writable arrays)."""
    if isinstance(rows, torch.Tensor):
        return rows.to(torch.uint8, copy=True)
    return torch.from_numpy(np.array(rows, dtype=np.uint8, copy=True))
