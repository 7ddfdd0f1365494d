"""GGUF blocks held as they are in the file: the raw-block schemes, as pure functions.

Some GGUF types cannot be turned into our group layout without rounding or growing
(see docs/import.md): the K-quants' effective scale ``d * sub_scale`` is an fp16 times a
4- to 8-bit integer, which is no fp16 in general, and 2-, 3-, 5- and 6-bit codes have no
place in a nibble. A weight in one of these types is stored as the file stores it: qweight is its
uint8 rows, ``K / block_elements * block_bytes`` bytes each, with no scales component;
the scheme names the block type. The functions here read those bytes into float32
exactly as gguf-py's ``gguf.quants.dequantize`` (and llama.cpp's ``dequantize_row_*``)
do: every product there is exact in float32 (an fp16 times integers of at most 13 bits),
so the one rounding is the final add or subtract, and our result equals theirs bit for
bit. The Triton kernels (kernels/triton_blocks.py) follow the same byte map.

Block layouts (llama.cpp ``ggml-common.h``; element e of a block, sub-block j):

- Q4_K, 256 elements, 144 bytes: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and
  mins for 8 sub-blocks of 32 (:func:`k4_scale_min`), 128 bytes of nibbles (element
  e = 64c + 32s + i is nibble s of byte 32c + i); value = d*sc[j]*q - dmin*m[j].
- Q5_K, 256 elements, 176 bytes: as Q4_K, with 32 bytes of high bits before the nibbles
  (bit j of byte i is the fifth bit of element 32j + i).
- Q6_K, 256 elements, 210 bytes: 128 bytes of low nibbles (e = 128h + 64s + i: nibble s
  of byte 64h + i), 64 bytes of 2-bit high parts (e = 128h + 32t + i: bits 2t of byte
  128 + 32h + i), 16 int8 scales (one per 16 elements), fp16 d; value = d*sc*(q - 32).
- Q5_0, 32 elements, 22 bytes: fp16 d, a little-endian uint32 of fifth bits, 16 bytes of
  nibbles (element i < 16 low nibble of byte i, i + 16 its high nibble); d*(q - 16).
- Q5_1, 32 elements, 24 bytes: fp16 d, fp16 m, then as Q5_0; value = d*q + m.
- Q2_K, 256 elements, 84 bytes: 16 bytes of 4-bit scale (low) and min (high) per
  sub-block of 16, 64 bytes of 2-bit codes (e = 128h + 32s + i: bits 2s of byte 32h + i),
  fp16 d, fp16 dmin; value = d*sc*q - dmin*m.
- Q3_K, 256 elements, 110 bytes: 32 bytes of high bits (bit j of byte i belongs to element
  32j + i; a set bit means no offset), 64 bytes of 2-bit low parts (as Q2_K), 12 bytes of
  6-bit scales for 16 sub-blocks of 16 (:func:`k3_scales`), fp16 d;
  value = d*(sc - 32)*(low - 4*(1 - high)).
- MXFP4 (ggml type 39; OCP microscaling FP4), 32 elements, 17 bytes: one e8m0 byte E (a
  power of two, 2^(E - 127); 255 is NaN), 16 bytes of 4-bit e2m1 codes (element i < 16 the
  low nibble of byte i, i + 16 its high nibble; code bit 3 is the sign, then magnitudes
  0, 0.5, 1, 1.5, 2, 3, 4, 6); value = 2^(E - 127) * e2m1, exact in float32 (gpt-oss's
  experts: :mod:`.mxfp4`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch

QK_K = 256  # elements of a K-quant super-block
CHUNK_ELEMENTS = 1 << 22  # elements dequantized at once: bounds the float32 temporaries


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at bytes [start, start + 2) of every block, as float32 (n, 1)."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor, chunk: int) -> torch.Tensor:
    """(n, B) bytes -> (n, B / chunk * 2, chunk) codes: per run of ``chunk`` bytes, the low
    nibbles, then the high ones (the order every type here uses)."""
    runs = qs.reshape(qs.shape[0], -1, 1, chunk)
    return torch.cat((runs & 0x0F, runs >> 4), dim=2).reshape(qs.shape[0], -1, chunk)


def k4_scale_min(packed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes (n, 12) -> 6-bit (scales, mins), each (n, 8) float32.

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top bits of scales 4-7; bytes 4-7 the
    same for the mins; bytes 8-11 the low nibbles of scales 4-7 and, high, of mins 4-7.
    """
    packed = packed.to(torch.int32)
    d, m, md = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat((d & 63, (md & 15) | ((d >> 2) & 48)), dim=1)
    mins = torch.cat((m & 63, (md >> 4) | ((m >> 2) & 48)), dim=1)
    return scales.to(torch.float32), mins.to(torch.float32)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales, mins = k4_scale_min(blocks[:, 4:16])
    q = _nibbles(blocks[:, 16:144], 32).to(torch.float32)  # (n, 8, 32)
    step = (_f16(blocks, 0) * scales).unsqueeze(-1)
    low = (_f16(blocks, 2) * mins).unsqueeze(-1)
    return (step * q - low).reshape(n, QK_K)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales, mins = k4_scale_min(blocks[:, 4:16])
    shifts = torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)
    high = (blocks[:, 16:48].reshape(n, 1, 32) >> shifts) & 1  # (n, 8, 32)
    q = (_nibbles(blocks[:, 48:176], 32) | (high << 4)).to(torch.float32)
    step = (_f16(blocks, 0) * scales).unsqueeze(-1)
    low = (_f16(blocks, 2) * mins).unsqueeze(-1)
    return (step * q - low).reshape(n, QK_K)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    low = _nibbles(blocks[:, :128], 64).reshape(n, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    high = ((blocks[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 8, 32)
    q = (low | (high << 4)).to(torch.float32) - 32
    scales = blocks[:, 192:208].contiguous().view(torch.int8).to(torch.float32)  # (n, 16)
    step = (_f16(blocks, 208) * scales).unsqueeze(-1)
    return (step * q.reshape(n, 16, 16)).reshape(n, QK_K)


def _two_bit(qs: torch.Tensor) -> torch.Tensor:
    """Q2_K/Q3_K's 64 bytes (n, 64) -> (n, 16, 16) two-bit codes, element order."""
    n = qs.shape[0]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    return ((qs.reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 16, 16)


def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales = (blocks[:, :16] & 15).to(torch.float32)  # (n, 16)
    mins = (blocks[:, :16] >> 4).to(torch.float32)
    step = (_f16(blocks, 80) * scales).unsqueeze(-1)  # (n, 16, 1)
    low = (_f16(blocks, 82) * mins).unsqueeze(-1)
    return (step * _two_bit(blocks[:, 16:80]).to(torch.float32) - low).reshape(n, QK_K)


def k3_scales(packed: torch.Tensor) -> torch.Tensor:
    """Q3_K's 12 bytes (n, 12) -> the 16 signed 6-bit scales (n, 16) float32: bytes 0-7 hold
    the low nibbles of scales 0-7 (low) and 8-15 (high), bytes 8-11 two bits of each."""
    n = packed.shape[0]
    low = (packed[:, :8].reshape(n, 1, 8) >> torch.tensor([0, 4], dtype=torch.uint8)
           .reshape(1, 2, 1)).reshape(n, 16) & 15
    high = (packed[:, 8:12].reshape(n, 1, 4) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
            .reshape(1, 4, 1)).reshape(n, 16) & 3
    return (low | (high << 4)).to(torch.float32) - 32


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    shifts = torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)
    high = ((blocks[:, :32].reshape(n, 1, 32) >> shifts) & 1).reshape(n, 16, 16)
    q = _two_bit(blocks[:, 32:96]).to(torch.float32) - 4 * (1 - high).to(torch.float32)
    step = (_f16(blocks, 108) * k3_scales(blocks[:, 96:108])).unsqueeze(-1)  # (n, 16, 1)
    return (step * q).reshape(n, QK_K)


def _q5_codes(blocks: torch.Tensor, qh_at: int) -> torch.Tensor:
    """Q5_0/Q5_1: the 32 five-bit codes (n, 32) from the uint32 of high bits at ``qh_at``."""
    n = blocks.shape[0]
    qh = blocks[:, qh_at:qh_at + 4].reshape(n, 4, 1)
    high = (qh >> torch.arange(8, dtype=torch.uint8).reshape(1, 1, 8)) & 1  # bit 8b + i
    low = _nibbles(blocks[:, qh_at + 4:qh_at + 20], 16).reshape(n, 32)
    return low | (high.reshape(n, 32) << 4)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    return _f16(blocks, 0) * (_q5_codes(blocks, 2).to(torch.float32) - 16)


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    return _f16(blocks, 0) * _q5_codes(blocks, 4).to(torch.float32) + _f16(blocks, 2)


# e2m1 values doubled (integers), by code; code 8 (-0) reads as +0, as in gguf-py and
# llama.cpp (transformers' table holds -0.0: equal as a value, not as a bit pattern)
E2M1_DOUBLED = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def e8m0_half(exponents: torch.Tensor) -> torch.Tensor:
    """uint8 e8m0 exponents E -> 2^(E - 128) as float32 (half the block scale, which the
    doubled e2m1 values take back), exact down to E = 0 (a subnormal); 255 -> NaN."""
    e = exponents.to(torch.int32)
    bits = torch.where(e < 2, torch.tensor(0x00200000, dtype=torch.int32) << e, (e - 1) << 23)
    half = bits.view(torch.float32)
    return torch.where(e == 255, torch.tensor(float("nan")), half)


def _mxfp4(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    codes = _nibbles(blocks[:, 1:17], 16).reshape(n, 32).to(torch.int64)
    return e8m0_half(blocks[:, :1]) * torch.tensor(E2M1_DOUBLED, dtype=torch.float32)[codes]


@dataclass(frozen=True)
class BlockFormat:
    """One GGUF block type held as raw bytes."""

    scheme: str  # our scheme name, e.g. "gguf-q4_k"
    ggml_type: str  # GGML type name, e.g. "Q4_K"
    kernel_code: int  # the Triton kernels' BLOCKS constexpr (0 is our own layout)
    block_elements: int  # elements per block along the input dimension
    block_bytes: int
    bits: int  # bits per code (what a summary calls it)
    fp16_fields: Tuple[int, ...]  # byte offsets of the block's fp16 scale(s) and minimum
    dequantize: Callable[[torch.Tensor], torch.Tensor]  # (n, bytes) u8 -> (n, elements) f32
    e8m0_fields: Tuple[int, ...] = ()  # byte offsets of power-of-two exponents (MXFP4)

    @property
    def bytes_per_param(self) -> float:
        return self.block_bytes / self.block_elements


FORMATS: Dict[str, BlockFormat] = {f.scheme: f for f in (
    BlockFormat("gguf-q4_k", "Q4_K", 1, QK_K, 144, 4, (0, 2), _q4_k),
    BlockFormat("gguf-q5_k", "Q5_K", 2, QK_K, 176, 5, (0, 2), _q5_k),
    BlockFormat("gguf-q6_k", "Q6_K", 3, QK_K, 210, 6, (208,), _q6_k),
    BlockFormat("gguf-q5_0", "Q5_0", 4, 32, 22, 5, (0,), _q5_0),
    BlockFormat("gguf-q5_1", "Q5_1", 5, 32, 24, 5, (0, 2), _q5_1),
    BlockFormat("gguf-q2_k", "Q2_K", 6, QK_K, 84, 2, (80, 82), _q2_k),
    BlockFormat("gguf-q3_k", "Q3_K", 7, QK_K, 110, 3, (108,), _q3_k),
    BlockFormat("mxfp4", "MXFP4", 8, 32, 17, 4, (), _mxfp4, e8m0_fields=(0,)),
)}
BLOCK_SCHEMES = tuple(FORMATS)
BY_GGML_TYPE: Dict[str, BlockFormat] = {f.ggml_type: f for f in FORMATS.values()}


def row_bytes(fmt: BlockFormat, in_features: int) -> int:
    """Stored bytes of one row of ``in_features`` elements (a whole number of blocks)."""
    return in_features // fmt.block_elements * fmt.block_bytes


def dequantize_rows(fmt: BlockFormat, rows: torch.Tensor, in_features: int) -> torch.Tensor:
    """(N, row_bytes) uint8 -> (N, in_features) float32, a bounded chunk of blocks at once."""
    out_features = rows.shape[0]
    blocks = rows.reshape(-1, fmt.block_bytes)
    out = torch.empty(blocks.shape[0], fmt.block_elements, dtype=torch.float32,
                      device=rows.device)
    step = CHUNK_ELEMENTS // fmt.block_elements
    for start in range(0, blocks.shape[0], step):
        out[start:start + step] = fmt.dequantize(blocks[start:start + step])
    return out.reshape(out_features, in_features)


def block_scales(fmt: BlockFormat, rows: torch.Tensor) -> torch.Tensor:
    """Every fp16 scale and minimum of the blocks (n_blocks, fields), as float32: what a
    finiteness check reads (the codes cannot be non-finite)."""
    blocks = rows.reshape(-1, fmt.block_bytes)
    return torch.cat([_f16(blocks, at) for at in fmt.fp16_fields]
                     + [e8m0_half(blocks[:, at:at + 1]) for at in fmt.e8m0_fields], dim=1)


def random_rows(fmt: BlockFormat, out_features: int, in_features: int,
                gen: torch.Generator, scale: float = 0.01) -> torch.Tensor:
    """Random valid rows: any bytes are valid codes and sub-scales once the fp16 fields are
    finite, so the fp16 fields get random normal values times ``scale``, the rest random
    bytes (tests and the kernel self-check)."""
    n_blocks = out_features * (in_features // fmt.block_elements)
    blocks = torch.randint(0, 256, (n_blocks, fmt.block_bytes), generator=gen,
                           dtype=torch.uint8)
    for at in fmt.fp16_fields:
        values = (torch.randn(n_blocks, 1, generator=gen) * scale).to(torch.float16)
        blocks[:, at:at + 2] = values.view(torch.uint8)
    for at in fmt.e8m0_fields:  # exponents within 2^+-8 of ``scale``, never 255 (NaN)
        centre = int(round(math.log2(scale))) + 127
        blocks[:, at] = torch.randint(max(centre - 8, 0), min(centre + 9, 255), (n_blocks,),
                                      generator=gen, dtype=torch.int32).to(torch.uint8)
    return blocks.reshape(out_features, -1)
