"""GPTQ rounding (Frantar et al. 2022), as a pure function, in our layout.

Round-to-nearest rounds every element on its own. GPTQ rounds the columns (input
channels) of a weight one at a time, left to right, and after each column shifts the
columns not yet rounded so that the layer's output on the calibration inputs changes as
little as possible: with H = X^T X (X the layer's inputs, one row per token), the error
e_k of column k is spread over the later columns j by -e_k * [H^-1]_kj / [H^-1]_kk. Using
the upper Cholesky factor U of H^-1 (H^-1 = U^T U) the update is
``W[:, j] -= (e_k / U_kk) * U_kj``, and every later step stays exact.

Details, as in the reference implementation:
- dampening: a fraction of the mean diagonal of H is added to it, so that H is safely
  invertible (few tokens, correlated channels);
- dead inputs (zero diagonal: the channel was always 0 in calibration, or padding) get a
  unit diagonal; their columns are rounded to nearest and nothing is propagated from them.
  The reference zeroes such columns; we keep them, since inputs that calibration never
  exercised may be live at inference;
- lazy block updates: the error of a block of columns reaches the columns right of the
  block in one matrix product, not one column at a time;
- each group's grid (scale, zero point) is fitted, as round-to-nearest would fit it, to
  the group's columns as they are when the group starts, i.e. after the error updates of
  the columns before it;
- no act-order: our groups are contiguous along the input and the runtime does not
  permute, so columns go in their natural order.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..errors import ConfigError, QuantizationError
from . import layout
from .layout import QuantSpec
from .quantize import QuantizedWeight, check_finite, grid_codes, group_grid, pack_codes

# Dampening retried with this factor more, at most this many times, if H + damping is
# still not positive definite in float32.
DAMPING_GROWTH = 10.0
DAMPING_RETRIES = 3


@dataclass(frozen=True)
class GPTQSettings:
    """GPTQ's numeric knobs."""

    damping: float = 0.01  # added to H's diagonal, as a fraction of its mean diagonal
    block_size: int = 128  # columns per lazy update (rounded up to whole groups)

    def __post_init__(self) -> None:
        if not 0.0 < self.damping < 1.0:
            raise ConfigError(f"GPTQ damping must be in (0, 1), got {self.damping}")
        if self.block_size < 1:
            raise ConfigError(f"GPTQ block size must be at least 1, got {self.block_size}")


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec,
                  settings: GPTQSettings = GPTQSettings(),
                  name: str = "<tensor>") -> QuantizedWeight:
    """Quantize (N, K) ``weight`` given the (K, K) ``hessian`` X^T X of its inputs.

    Computes in float32 on ``weight``'s device; the result is on that device.
    """
    _check_inputs(weight, hessian, spec, name)
    out_features, in_features = weight.shape
    padded = spec.padded_in(in_features)
    work = torch.nn.functional.pad(weight.to(torch.float32), (0, padded - in_features))
    factor = inverse_cholesky(hessian.to(weight.device), padded, settings.damping, name)
    codes = torch.empty(out_features, padded, dtype=torch.int8, device=weight.device)
    groups = spec.num_groups(in_features)
    scales = torch.empty(out_features, groups, dtype=spec.scale_torch_dtype,
                         device=weight.device)
    zeros = torch.empty(out_features, groups, device=weight.device) if spec.has_zeros else None
    block = -(-max(settings.block_size, spec.group_size) // spec.group_size) * spec.group_size
    for start in range(0, padded, block):
        end = min(start + block, padded)
        _quantize_block(work, factor, start, end, spec, codes, scales, zeros)
    return QuantizedWeight(pack_codes(codes, spec), scales,
                           None if zeros is None else zeros.to(torch.uint8), spec,
                           out_features, in_features)


def _check_inputs(weight, hessian, spec: QuantSpec, name: str) -> None:
    if weight.dim() != 2 or not weight.is_floating_point():
        raise QuantizationError(f"tensor {name!r}: expected a 2-D float weight, got "
                                f"{tuple(weight.shape)} {weight.dtype}")
    if spec.scheme not in layout.SCHEMES:
        raise QuantizationError(f"tensor {name!r}: GPTQ quantizes to one of "
                                f"{', '.join(layout.SCHEMES)}, not {spec.scheme}")
    in_features = weight.shape[1]
    if tuple(hessian.shape) != (in_features, in_features):
        raise QuantizationError(f"tensor {name!r}: Hessian has shape {tuple(hessian.shape)}, "
                                f"expected ({in_features}, {in_features})")
    check_finite(name, weight)
    if not torch.isfinite(hessian).all():
        raise QuantizationError(
            f"tensor {name!r}: the Hessian of its calibration inputs is not finite (NaN or "
            "Inf activations): the source checkpoint or the calibration text overflows; "
            "check the checkpoint, or use --method awq or rtn")


def inverse_cholesky(hessian: torch.Tensor, padded: int, damping: float,
                     name: str = "<tensor>") -> torch.Tensor:
    """Upper Cholesky factor U of (H + damping)^-1, H zero-padded to (padded, padded)."""
    size = hessian.shape[0]
    h = torch.zeros(padded, padded, dtype=torch.float32, device=hessian.device)
    h[:size, :size] = hessian
    diagonal = h.diagonal()
    diagonal[diagonal == 0] = 1.0  # dead inputs and padding: no coupling, unit weight
    mean_diagonal = float(diagonal.mean())
    for attempt in range(DAMPING_RETRIES + 1):
        damped = h + torch.eye(padded, device=h.device) * (
            damping * DAMPING_GROWTH ** attempt * mean_diagonal)
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper
    raise QuantizationError(
        f"tensor {name!r}: the Hessian of its calibration inputs is not positive definite "
        f"even with {damping * DAMPING_GROWTH ** DAMPING_RETRIES:g} x its mean diagonal "
        "added; use more calibration text (--calib-samples) or --method awq")


def _quantize_block(work, factor, start: int, end: int, spec: QuantSpec, codes, scales,
                    zeros) -> None:
    """Round columns [start, end) of ``work`` (N, K_padded) in place, filling codes and the
    grids of the groups that start there, and push the block's error right of it."""
    block = work[:, start:end].clone()  # (N, B) updated column by column
    errors = torch.empty_like(block)  # (N, B) scaled errors, for the lazy update
    with _one_cpu_thread(work.device):
        _round_columns(block, errors, factor[start:end, start:end], start, spec, codes,
                       scales, zeros)
    work[:, end:] -= errors @ factor[start:end, end:]


@contextmanager
def _one_cpu_thread(device: torch.device):
    """The column loop issues thousands of small ops, which gain nothing from threads and
    lose much when the cores are shared: GPTQ of a 1536 x 576 weight on 2 busy cores took
    15.4 s with 2 threads, 1.8 s with this loop in one thread."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _round_columns(block, errors, local, start: int, spec: QuantSpec, codes, scales,
                   zeros) -> None:
    """GPTQ within one block: round column i, spread its error over columns i+1.. of the
    block (``local``: the block's part of the factor), keep the scaled error."""
    group_size = spec.group_size
    for i in range(block.shape[1]):
        column = start + i
        if column % group_size == 0:  # a group starts: fit its grid to the current weights
            group = column // group_size
            scales[:, group], group_zeros = group_grid(block[:, i: i + group_size], spec)
            if zeros is not None:
                zeros[:, group] = group_zeros
            scale = scales[:, group].to(torch.float32)
            zero = None if zeros is None else zeros[:, group]
        code = grid_codes(block[:, i], scale, zero, spec)
        restored = (code if zero is None else code - zero) * scale
        codes[:, column] = code.to(torch.int8)
        error = (block[:, i] - restored) / local[i, i]
        block[:, i:] -= error.unsqueeze(1) * local[i, i:].unsqueeze(0)
        errors[:, i] = error
