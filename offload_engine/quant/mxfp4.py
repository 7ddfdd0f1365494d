"""gpt-oss's MXFP4 expert tensors <-> MXFP4 blocks as GGUF stores them, as pure functions.

gpt-oss checkpoints (transformers ``integrations/mxfp4.py``, ``convert_moe_packed_tensors``)
hold each experts matrix as two uint8 tensors: ``*_blocks`` (..., N, K / 32, 16), two e2m1
codes per byte, element 2j of a block in the low nibble of byte j and 2j + 1 in the high
one; and ``*_scales`` (..., N, K / 32), the block's e8m0 exponent (value 2^(E - 127)).
The raw-block scheme ``mxfp4`` (:mod:`.block_formats`) holds GGUF's MXFP4 block: the
exponent byte, then 16 bytes with element i < 16 in the low nibble of byte i and i + 16 in
its high nibble. Only the nibbles move between the two; no value changes.
"""

from __future__ import annotations

import torch

from ..errors import QuantizationError
from .block_formats import FORMATS
from .layout import QuantSpec
from .quantize import QuantizedWeight

BLOCK = 32
SPEC = QuantSpec("mxfp4", BLOCK, "fp16")
_BYTES = FORMATS["mxfp4"].block_bytes  # 17


def gguf_rows(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """gpt-oss (N, G, 16) codes and (N, G) exponents -> (N, G * 17) GGUF MXFP4 rows."""
    rows, groups = scales.shape
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).reshape(rows, groups, 2, 16)
    codes = codes.reshape(rows, groups, BLOCK)  # element order
    nibbles = codes[..., :16] | (codes[..., 16:] << 4)
    return torch.cat((scales.unsqueeze(-1), nibbles), dim=-1).reshape(rows, groups * _BYTES)


def gpt_oss_tensors(rows: torch.Tensor):
    """Inverse of :func:`gguf_rows`: (N, G * 17) rows -> (blocks (N, G, 16), scales (N, G))."""
    out_features = rows.shape[0]
    blocks = rows.reshape(out_features, -1, _BYTES)
    nibbles = blocks[..., 1:]
    codes = torch.cat((nibbles & 0x0F, nibbles >> 4), dim=-1)  # element order
    paired = codes.reshape(out_features, -1, 16, 2)
    return paired[..., 0] | (paired[..., 1] << 4), blocks[..., 0].contiguous()


def import_expert(blocks: torch.Tensor, scales: torch.Tensor,
                  name: str = "<tensor>") -> QuantizedWeight:
    """One expert's matrix (N, K = G * 32) from its gpt-oss blocks and scales, exactly."""
    if (blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.dim() != 3
            or blocks.shape[-1] != 16 or tuple(blocks.shape[:2]) != tuple(scales.shape)):
        raise QuantizationError(
            f"tensor {name!r}: MXFP4 blocks {tuple(blocks.shape)} {blocks.dtype} and scales "
            f"{tuple(scales.shape)} {scales.dtype} are not gpt-oss's (N, K/32, 16) and "
            "(N, K/32) uint8; is the checkpoint damaged?")
    out_features, groups = scales.shape
    return QuantizedWeight(gguf_rows(blocks, scales), None, None, SPEC, out_features,
                           groups * BLOCK)
