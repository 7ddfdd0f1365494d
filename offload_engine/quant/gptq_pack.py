"""GPTQ's packing (v1 and v2), unpacked into our layout exactly (pure functions, no I/O).

Layout as AutoGPTQ's ``QuantLinear.pack`` writes it (vLLM's ``gptq`` loader and
GPTQModel's ``convert_gptq_v1_to_v2_format`` read it the same way):

- ``qweight`` int32 (K / 8, N): the codes transposed to (K, N), packed along K: nibble i
  (shift 4i) of row r holds input row 8r + i.
- ``qzeros`` int32 (K / group, N / 8): zero points packed along N, nibble i of word c
  holding column 8c + i.
- ``scales`` fp16 (K / group, N); ``g_idx`` int32 (K,): the group of each input row.

Value = (code - zero) * scale. Version 1 (AutoGPTQ, ``checkpoint_format`` "gptq" or
absent) stores ``zero - 1`` and readers add 1 back; version 2 (GPTQModel's "gptq_v2")
stores the zero itself. A v1 nibble of 15 is ambiguous: it is what AutoGPTQ's packer
writes for a true zero of 0 (-1 wrapped, which also spills ones into the neighbouring
nibbles), while v1 readers compute a zero of 16; such a weight is refused, not guessed.

Act-order (``desc_act``): g_idx then sends input row k to a group that is not
k // group; our groups are runs of consecutive inputs, so such a weight is refused
(see :func:`check_g_idx`).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import QuantizationError
from .int32_pack import SEQUENTIAL_ORDER, to_quantized_weight, unpack_first_dim, unpack_last_dim
from .quantize import QuantizedWeight

VERSIONS = (1, 2)
V1_ZERO_OFFSET = 1  # v1 stores zero - 1
V1_AMBIGUOUS_NIBBLE = 0xF


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                group_size: int, version: int, g_idx: Optional[torch.Tensor] = None,
                name: str = "<tensor>") -> QuantizedWeight:
    """Our QuantizedWeight of one GPTQ linear (codes, zeros and scales copied)."""
    codes_kn = unpack_first_dim(qweight)  # (K, N)
    zeros_gn = unpack_zeros(qzeros, version, name)  # (G, N)
    if g_idx is not None:
        check_g_idx(g_idx, group_size, name)
    return to_quantized_weight(name, codes_kn, zeros_gn, scales, group_size)


def unpack_zeros(qzeros: torch.Tensor, version: int, name: str = "<tensor>") -> torch.Tensor:
    """The true zero points (G, N) of a qzeros tensor, v1's offset removed."""
    if version not in VERSIONS:
        raise QuantizationError(f"tensor {name!r}: unknown GPTQ packing version {version}")
    stored = unpack_last_dim(qzeros, SEQUENTIAL_ORDER)
    if version == 2:
        return stored
    if bool((stored == V1_AMBIGUOUS_NIBBLE).any()):
        raise QuantizationError(
            f"tensor {name!r}: a GPTQ v1 zero point is stored as 15, which v1 readers take as "
            "16 while AutoGPTQ's packer wrote it for a zero of 0 (corrupting its neighbours); "
            "this checkpoint cannot be imported exactly. Re-save it in GPTQModel's gptq_v2 "
            "format, or convert the unquantized original")
    return stored + V1_ZERO_OFFSET


def _run_length(g_idx: torch.Tensor):
    """The group size a sorted, evenly grouped g_idx (not act-order) was written with."""
    if g_idx.numel() == 0 or int(g_idx[0]) != 0 or not bool((g_idx[1:] - g_idx[:-1] >= 0).all()):
        return None
    size = int((g_idx == 0).sum())
    expected = torch.arange(g_idx.numel(), dtype=torch.int64) // size
    return size if torch.equal(g_idx, expected) else None


def check_g_idx(g_idx: torch.Tensor, group_size: int, name: str = "<tensor>") -> None:
    """Refuse act-order: every input row k must belong to group k // group_size.

    An exact import of act-order would need each linear's input gathered by a stored
    permutation at run time (as vLLM's and ExLlama's kernels do) or per-input group
    indices in our kernels; our layout holds neither, and permuting the weight alone
    changes the product. GPTQ checkpoints quantized without desc_act pass.
    """
    expected = torch.arange(g_idx.numel(), dtype=torch.int64) // group_size
    given = g_idx.to(torch.int64)
    if not torch.equal(given, expected):
        runs = _run_length(given)
        if runs is not None:
            raise QuantizationError(
                f"tensor {name!r}: its g_idx puts runs of {runs} consecutive inputs in a group, "
                f"but the checkpoint's config says group_size {group_size}; the config is "
                "wrong: fix group_size in its quantization_config (or quantize_config.json)")
        raise QuantizationError(
            f"tensor {name!r}: its g_idx is act-order (desc_act), which cannot be imported "
            "exactly: our groups are runs of consecutive inputs and the runtime does not "
            "permute activations. Use a GPTQ checkpoint quantized with desc_act=false, or "
            "convert the unquantized original")
