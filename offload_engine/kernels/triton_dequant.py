"""Prefill path: dequantize into a reusable scratch buffer, then one dense matmul.

For many rows of x (prefill) the matmul is compute bound, so the weight is expanded
once into x's dtype by a Triton kernel and handed to torch's GEMM. The expanded
weight lives in a scratch buffer kept per (device, dtype) and reused while it is large
enough; weights bigger than ``max_scratch_elements`` are done in slices of rows so the
scratch stays bounded (the lm_head of a 32B model would otherwise need 1.5 GB).

Importing this module imports triton; the gateway does that lazily.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch
import torch.nn.functional as F
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

# Upper bound on one scratch buffer: 64 Mi elements (128 MiB in bf16).
DEFAULT_MAX_SCRATCH_ELEMENTS = 1 << 26

_scratch: dict = {}  # (device, dtype) -> 1-D tensor, grown on demand, never shrunk
_scratch_lock = threading.Lock()


def scratch(numel: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D buffer of at least ``numel`` elements, reused across calls.

    The buffer is only valid until the next call for the same (device, dtype); all work
    on it is queued on the current stream, so stream order keeps reuse safe.
    """
    key = (torch.device(device), dtype)
    with _scratch_lock:
        buf = _scratch.get(key)
        if buf is None or buf.numel() < numel:
            _scratch.pop(key, None)
            buf = torch.empty(numel, device=device, dtype=dtype)
            _scratch[key] = buf
        return buf[:numel]


def clear_scratch() -> None:
    """Drop every scratch buffer (frees their memory once no kernel uses them)."""
    with _scratch_lock:
        _scratch.clear()


def scratch_bytes() -> int:
    """Bytes currently held in scratch buffers."""
    with _scratch_lock:
        return sum(buf.numel() * buf.element_size() for buf in _scratch.values())


@triton.jit
def _dequant_kernel(
    q_ptr, s_ptr, z_ptr, out_ptr, N, K, padded_in, n_groups,
    GROUP: tl.constexpr, BITS: tl.constexpr, OFFSET: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCKS: tl.constexpr, BLOCK_BYTES: tl.constexpr,
):
    """out[n, k] = dequant(W)[n, k] in out's dtype for the unpadded (N, K) weight."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    w = load_weight_tile(q_ptr, s_ptr, z_ptr, offs_n, k0, N, padded_in, n_groups,
                         GROUP, BITS, OFFSET, BLOCK_N, BLOCK_K, BLOCKS, BLOCK_BYTES)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    ptrs = out_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(ptrs, w.to(out_ptr.dtype.element_ty), mask=mask)


def _tiles(group_size: int, on_gpu: bool) -> tuple:
    if on_gpu:
        return 32, block_k_for(group_size, 256)
    return 128, block_k_for(group_size, 256)  # the interpreter pays ~1 ms per program


def dequantize_into(weight: QuantizedWeight, out: torch.Tensor, row_start: int = 0) -> None:
    """Write dequant(weight)[row_start : row_start + out.shape[0]] into ``out`` (rows, K)."""
    rows, in_features = out.shape
    if in_features != weight.in_features or not out.is_contiguous():
        raise ValueError("out must be a contiguous (rows, in_features) tensor")
    spec = weight.spec
    qweight, scales, zeros, padded, n_groups = weight_args(weight)
    stop = row_start + rows
    if weight.zeros is not None or weight.mins is not None:  # per-row offsets
        zeros = zeros[row_start:stop]
    block_n, block_k = _tiles(spec.group_size, out.is_cuda and not interpreted())
    grid = (triton.cdiv(rows, block_n), triton.cdiv(in_features, block_k))
    _dequant_kernel[grid](
        qweight[row_start:stop], scales[row_start:stop], zeros, out,
        rows, in_features, padded, n_groups,
        GROUP=spec.group_size, BITS=spec.bits, OFFSET=spec.offset_mode,
        BLOCK_N=block_n, BLOCK_K=block_k, **block_args(weight),
    )


def dequant_matmul(
    x: torch.Tensor,
    weight: QuantizedWeight,
    bias: Optional[torch.Tensor] = None,
    max_scratch_elements: int = DEFAULT_MAX_SCRATCH_ELEMENTS,
) -> torch.Tensor:
    """y = x @ dequant(weight).T + bias via a scratch dequantization and torch.matmul."""
    check_launchable(x, weight)
    n_out, in_features = weight.out_features, weight.in_features
    x2d = x.reshape(-1, in_features)
    rows_per_chunk = max(1, min(n_out, max_scratch_elements // max(1, in_features)))
    buf = scratch(rows_per_chunk * in_features, x.device, x.dtype)
    if rows_per_chunk == n_out:
        dense = buf.view(n_out, in_features)
        dequantize_into(weight, dense)
        return F.linear(x, dense, bias)
    y = torch.empty((x2d.shape[0], n_out), device=x.device, dtype=x.dtype)
    for start in range(0, n_out, rows_per_chunk):
        stop = min(n_out, start + rows_per_chunk)
        dense = buf[: (stop - start) * in_features].view(stop - start, in_features)
        dequantize_into(weight, dense, row_start=start)
        y[:, start:stop] = torch.matmul(x2d, dense.t())
    if bias is not None:
        y += bias
    return y.reshape(*x.shape[:-1], n_out)
