"""Fused decode kernel: y = x @ dequant(W).T (+ bias) for a few rows of x (M <= 16).

Each program owns BLOCK_N output features and a slice of the input dimension. It
reads packed codes, scales and zero points, dequantizes them in registers and
accumulates in float32; no dequantized weight is ever written to memory. When the
output features alone give too few programs to fill the GPU, the input dimension
is split (split-K) into float32 partial sums that are added up afterwards.

Importing this module imports triton; the gateway does that lazily.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ..quant.quantize import QuantizedWeight
from .triton_tiles import (
    block_args,
    block_k_for,
    check_launchable,
    interpreted,
    load_weight_tile,
    weight_args,
)

MAX_ROWS = 16  # the decode kernel takes at most this many rows of x


@dataclass(frozen=True)
class GemvConfig:
    """Launch shape of the decode kernel."""

    block_n: int  # output features per program
    block_k: int  # input elements per loop step (a multiple of the group size)
    split_k: int = 1  # programs sharing one output tile along K (1: no partial sums)
    num_warps: int = 4  # warps per program (ignored by the interpreter)


def default_config(x: torch.Tensor, weight: QuantizedWeight) -> GemvConfig:
    """Few large tiles under the interpreter; on a GPU, enough programs to fill it."""
    group = weight.spec.group_size
    if interpreted() or not x.is_cuda:
        return GemvConfig(block_n=64, block_k=block_k_for(group, 256))
    padded = weight.spec.padded_in(weight.in_features)
    return _gpu_config(weight.out_features, padded, group, x.device.index)


@functools.lru_cache(maxsize=1024)
def _gpu_config(n_out: int, padded_in: int, group: int, device_index: int) -> GemvConfig:
    """Tiles of 32 features x 256 inputs; split K until there are two programs per SM."""
    block_n, block_k = 32, block_k_for(group, 256)
    n_blocks = triton.cdiv(n_out, block_n)
    k_blocks = triton.cdiv(padded_in, block_k)
    sms = torch.cuda.get_device_properties(device_index).multi_processor_count
    split_k = max(1, min(k_blocks, triton.cdiv(2 * sms, n_blocks)))
    return GemvConfig(block_n=block_n, block_k=block_k, split_k=split_k)


@triton.jit
def _acc_one_row(
    x_ptr, q_ptr, s_ptr, z_ptr, offs_n, k_lo, k_hi, K, N, padded_in, n_groups,
    GROUP: tl.constexpr, BITS: tl.constexpr, OFFSET: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCKS: tl.constexpr, BLOCK_BYTES: tl.constexpr,
):
    """(BLOCK_N,) float32 partial dot products of one row of x: a multiply and a row sum."""
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0).to(tl.float32)
        w = load_weight_tile(q_ptr, s_ptr, z_ptr, offs_n, k0, N, padded_in, n_groups,
                             GROUP, BITS, OFFSET, BLOCK_N, BLOCK_K, BLOCKS, BLOCK_BYTES)
        # Round the weight to x's dtype, as the reference dequantizes in x's dtype.
        w = w.to(x_ptr.dtype.element_ty).to(tl.float32)
        acc += tl.sum(w * xv[None, :], axis=1)
    return acc


@triton.jit
def _acc_rows(
    x_ptr, q_ptr, s_ptr, z_ptr, offs_n, k_lo, k_hi, M, K, N, padded_in, n_groups, stride_xm,
    GROUP: tl.constexpr, BITS: tl.constexpr, OFFSET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, BLOCKS: tl.constexpr, BLOCK_BYTES: tl.constexpr,
):
    """(BLOCK_M, BLOCK_N) float32 partial products of up to BLOCK_M rows, by tl.dot."""
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
        xt = tl.load(x_ptrs, mask=x_mask, other=0)  # (BLOCK_M, BLOCK_K) in x's dtype
        w = load_weight_tile(q_ptr, s_ptr, z_ptr, offs_n, k0, N, padded_in, n_groups,
                             GROUP, BITS, OFFSET, BLOCK_N, BLOCK_K, BLOCKS, BLOCK_BYTES)
        w = w.to(x_ptr.dtype.element_ty)
        if DOT_FP32:  # fp32 x, or the interpreter (which cannot multiply bf16)
            acc = tl.dot(xt.to(tl.float32), tl.trans(w.to(tl.float32)), acc,
                         input_precision="ieee")
        else:  # bf16 / fp16 tensor cores, float32 accumulation
            acc = tl.dot(xt, tl.trans(w), acc)
    return acc


@triton.jit
def _gemv_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K, padded_in, n_groups, stride_xm, k_per_split, stride_ys,
    GROUP: tl.constexpr, BITS: tl.constexpr, OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, BLOCKS: tl.constexpr, BLOCK_BYTES: tl.constexpr,
):
    """y[s, m, n] = sum over this program's K slice s; bias only when there is one slice."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, padded_in)
    y_base = y_ptr + pid_k * stride_ys
    if BLOCK_M == 1:
        acc = _acc_one_row(x_ptr, q_ptr, s_ptr, z_ptr, offs_n, k_lo, k_hi, K, N, padded_in,
                           n_groups, GROUP, BITS, OFFSET, BLOCK_N, BLOCK_K, BLOCKS,
                           BLOCK_BYTES)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0).to(tl.float32)
        tl.store(y_base + offs_n, acc.to(y_ptr.dtype.element_ty), mask=offs_n < N)
    else:
        acc = _acc_rows(x_ptr, q_ptr, s_ptr, z_ptr, offs_n, k_lo, k_hi, M, K, N, padded_in,
                        n_groups, stride_xm, GROUP, BITS, OFFSET, BLOCK_M, BLOCK_N, BLOCK_K,
                        DOT_FP32, BLOCKS, BLOCK_BYTES)
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0).to(tl.float32)
            acc += bias[None, :]
        offs_m = tl.arange(0, BLOCK_M)
        y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        y_ptrs = y_base + offs_m[:, None] * N + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def gemv(
    x: torch.Tensor,
    weight: QuantizedWeight,
    bias: Optional[torch.Tensor] = None,
    config: Optional[GemvConfig] = None,
) -> torch.Tensor:
    """y = x @ dequant(weight).T + bias for x of shape (..., K) with at most 16 rows."""
    check_launchable(x, weight)
    x2d = x.reshape(-1, weight.in_features)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    rows, n_out = x2d.shape[0], weight.out_features
    if rows > MAX_ROWS:
        raise ValueError(f"the decode kernel takes at most {MAX_ROWS} rows, got {rows}")
    cfg = config or default_config(x, weight)
    spec = weight.spec
    block_k = block_k_for(spec.group_size, cfg.block_k)
    qweight, scales, zeros, padded, n_groups = weight_args(weight)
    k_per_split = triton.cdiv(triton.cdiv(padded, block_k), cfg.split_k) * block_k
    split_k = triton.cdiv(padded, k_per_split)
    y = torch.empty((rows, n_out), device=x.device, dtype=x.dtype)
    if rows == 0:
        return y.reshape(*x.shape[:-1], n_out)
    out = y if split_k == 1 else torch.empty((split_k, rows, n_out), device=x.device,
                                             dtype=torch.float32)
    in_kernel_bias = bias is not None and split_k == 1
    grid = (triton.cdiv(n_out, cfg.block_n), split_k)
    _gemv_kernel[grid](
        x2d, qweight, scales, zeros, bias if in_kernel_bias else scales, out,
        rows, n_out, weight.in_features, padded, n_groups, x2d.stride(0), k_per_split,
        rows * n_out,
        GROUP=spec.group_size, BITS=spec.bits, OFFSET=spec.offset_mode,
        HAS_BIAS=in_kernel_bias, BLOCK_M=1 if rows == 1 else MAX_ROWS, BLOCK_N=cfg.block_n,
        BLOCK_K=block_k, DOT_FP32=interpreted() or x.dtype == torch.float32,
        num_warps=cfg.num_warps, **block_args(weight),
    )
    if split_k > 1:
        total = out.sum(dim=0)
        if bias is not None:
            total += bias.to(torch.float32)
        y.copy_(total)
    return y.reshape(*x.shape[:-1], n_out)
