"""Reading a tile of a raw-block weight (GGUF Q2_K ... Q6_K, Q5_0, Q5_1, MXFP4) in registers.

The byte map is the one of :mod:`offload_engine.quant.block_formats` (llama.cpp's
``ggml-common.h``); each element of the (BLOCK_N, BLOCK_K) tile gathers its code bits,
its sub-block scale (and minimum) and its block's fp16 fields by address, so one function
serves every type with the type as a constexpr. The float32 arithmetic is the
reference's: products of an fp16 and small integers are exact, and the one rounding is
the final add or subtract, so a tile equals the reference dequantization bit for bit.

Importing this module imports triton and defines (never compiles) the jit helpers.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..quant.block_formats import FORMATS

Q4_K = tl.constexpr(FORMATS["gguf-q4_k"].kernel_code)
Q5_K = tl.constexpr(FORMATS["gguf-q5_k"].kernel_code)
Q6_K = tl.constexpr(FORMATS["gguf-q6_k"].kernel_code)
Q5_0 = tl.constexpr(FORMATS["gguf-q5_0"].kernel_code)
Q5_1 = tl.constexpr(FORMATS["gguf-q5_1"].kernel_code)
Q2_K = tl.constexpr(FORMATS["gguf-q2_k"].kernel_code)
MXFP4 = tl.constexpr(FORMATS["mxfp4"].kernel_code)


@triton.jit
def _byte(q_ptr, offs, mask):
    return tl.load(q_ptr + offs, mask=mask, other=0).to(tl.int32)


@triton.jit
def _fp16(q_ptr, offs, mask):
    """The little-endian fp16 at byte offsets ``offs``, as float32 (0 where masked)."""
    bits = _byte(q_ptr, offs, mask) | (_byte(q_ptr, offs + 1, mask) << 8)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _k4_scale_min(q_ptr, base, j, mask):
    """Q4_K/Q5_K: the 6-bit scale and min of sub-block ``j`` from bytes 4..15 of a block."""
    jl = j % 4
    a = _byte(q_ptr, base + 4 + jl, mask)  # scales 0-3, top bits of scales 4-7
    b = _byte(q_ptr, base + 8 + jl, mask)  # mins 0-3, top bits of mins 4-7
    c = _byte(q_ptr, base + 12 + jl, mask)  # low nibbles of scales 4-7 / mins 4-7
    sc = tl.where(j < 4, a & 63, (c & 15) | ((a >> 2) & 48))
    mn = tl.where(j < 4, b & 63, (c >> 4) | ((b >> 2) & 48))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _k_min_tile(q_ptr, base, e, mask, FIFTH: tl.constexpr):
    """Q4_K (FIFTH False) and Q5_K: d * sc[j] * q - dmin * m[j], j = e // 32."""
    j = e // 32
    sc, mn = _k4_scale_min(q_ptr, base, j, mask)
    qs_at = 48 if FIFTH else 16
    packed = _byte(q_ptr, base + qs_at + (e // 64) * 32 + e % 32, mask)
    q = (packed >> ((j % 2) * 4)) & 15
    if FIFTH:
        q = q | (((_byte(q_ptr, base + 16 + e % 32, mask) >> j) & 1) << 4)
    step = _fp16(q_ptr, base, mask) * sc
    low = _fp16(q_ptr, base + 2, mask) * mn
    return step * q.to(tl.float32) - low


@triton.jit
def _q6_k_tile(q_ptr, base, e, mask):
    """Q6_K: d * sc[e // 16] * (q - 32), q from a low nibble and two high bits."""
    h = e // 128
    r = e % 128
    low = (_byte(q_ptr, base + h * 64 + r % 64, mask) >> ((r // 64) * 4)) & 15
    high = (_byte(q_ptr, base + 128 + h * 32 + r % 32, mask) >> ((r // 32) * 2)) & 3
    q = (low | (high << 4)) - 32
    sc = _byte(q_ptr, base + 192 + e // 16, mask)
    sc = tl.where(sc >= 128, sc - 256, sc)  # int8
    step = _fp16(q_ptr, base + 208, mask) * sc.to(tl.float32)
    return step * q.to(tl.float32)


@triton.jit
def _two_bit(q_ptr, base, e, mask):
    """Q2_K/Q3_K: the 2-bit code of element e from 64 bytes at ``base``."""
    return (_byte(q_ptr, base + (e // 128) * 32 + e % 32, mask) >> (((e % 128) // 32) * 2)) & 3


@triton.jit
def _q2_k_tile(q_ptr, base, e, mask):
    """Q2_K: d * sc * q - dmin * m, a 4-bit scale and min per 16 elements."""
    packed = _byte(q_ptr, base + e // 16, mask)
    q = _two_bit(q_ptr, base + 16, e, mask)
    step = _fp16(q_ptr, base + 80, mask) * (packed & 15).to(tl.float32)
    low = _fp16(q_ptr, base + 82, mask) * (packed >> 4).to(tl.float32)
    return step * q.to(tl.float32) - low


@triton.jit
def _q3_k_tile(q_ptr, base, e, mask):
    """Q3_K: d * (sc - 32) * (low - 4 * (1 - high)), a 6-bit scale per 16 elements."""
    t = e // 16  # sub-block: low nibble from byte t % 8 (high nibble for t >= 8),
    low_bits = (_byte(q_ptr, base + 96 + t % 8, mask) >> ((t // 8) * 4)) & 15
    top = (_byte(q_ptr, base + 104 + t % 4, mask) >> ((t // 4) * 2)) & 3  # two bits: byte t % 4
    sc = (low_bits | (top << 4)) - 32
    high = (_byte(q_ptr, base + e % 32, mask) >> (e // 32)) & 1
    q = _two_bit(q_ptr, base + 32, e, mask) - 4 * (1 - high)
    step = _fp16(q_ptr, base + 108, mask) * sc.to(tl.float32)
    return step * q.to(tl.float32)


@triton.jit
def _q5_tile(q_ptr, base, e, mask, HAS_MIN: tl.constexpr):
    """Q5_0 (d * (q - 16)) and Q5_1 (d * q + m): 32-element blocks."""
    qh_at = 4 if HAS_MIN else 2
    fifth = (_byte(q_ptr, base + qh_at + e // 8, mask) >> (e % 8)) & 1
    low = (_byte(q_ptr, base + qh_at + 4 + e % 16, mask) >> ((e // 16) * 4)) & 15
    q = (low | (fifth << 4)).to(tl.float32)
    d = _fp16(q_ptr, base, mask)
    if HAS_MIN:
        w = d * q + _fp16(q_ptr, base + 2, mask)
    else:
        w = d * (q - 16.0)
    return w


@triton.jit
def _mxfp4_tile(q_ptr, base, e, mask):
    """MXFP4: 2^(E - 127) * e2m1, as half the scale times the doubled value (both exact).
    E = 255 (NaN) never gets here: an import refuses it as a non-finite scale."""
    code = (_byte(q_ptr, base + 1 + e % 16, mask) >> ((e // 16) * 4)) & 15
    mag = code & 7  # doubled e2m1: 0 1 2 3, then 4 6 8 12 = (2 + (mag & 1)) << (mag/2 - 1)
    shift = tl.maximum((mag >> 1) - 1, 0)
    doubled = tl.where(mag < 4, mag, (2 + (mag & 1)) << shift)
    value = tl.where(code >= 8, -doubled, doubled).to(tl.float32)  # code 8 -> +0
    exponent = _byte(q_ptr, base, mask)
    bits = tl.where(exponent < 2, 0x00200000 << exponent, (exponent - 1) << 23)
    return bits.to(tl.float32, bitcast=True) * value


@triton.jit
def load_block_tile(
    q_ptr, offs_n, k0, N, K,
    BLOCKS: tl.constexpr, BLOCK_ELEMS: tl.constexpr, BLOCK_BYTES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Dequantized float32 tile W[offs_n, k0:k0 + BLOCK_K] of a raw-block weight; zero
    outside it. Row n starts at byte n * K / BLOCK_ELEMS * BLOCK_BYTES."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    row_bytes = (K // BLOCK_ELEMS) * BLOCK_BYTES
    base = (offs_n.to(tl.int64)[:, None] * row_bytes
            + (offs_k // BLOCK_ELEMS)[None, :] * BLOCK_BYTES)  # (BLOCK_N, BLOCK_K)
    e = (offs_k % BLOCK_ELEMS)[None, :]
    if BLOCKS == Q4_K:
        w = _k_min_tile(q_ptr, base, e, mask, False)
    elif BLOCKS == Q5_K:
        w = _k_min_tile(q_ptr, base, e, mask, True)
    elif BLOCKS == Q6_K:
        w = _q6_k_tile(q_ptr, base, e, mask)
    elif BLOCKS == Q5_0:
        w = _q5_tile(q_ptr, base, e, mask, False)
    elif BLOCKS == Q5_1:
        w = _q5_tile(q_ptr, base, e, mask, True)
    elif BLOCKS == Q2_K:
        w = _q2_k_tile(q_ptr, base, e, mask)
    elif BLOCKS == MXFP4:
        w = _mxfp4_tile(q_ptr, base, e, mask)
    else:
        w = _q3_k_tile(q_ptr, base, e, mask)
    return tl.where(mask, w, 0.0)
