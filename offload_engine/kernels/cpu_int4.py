"""CPU path for int4 linears: torch's packed int4 matmul (``_weight_int4pack_mm_for_cpu``).

torch ships a CPU kernel that reads int4 codes where they lie and dequantizes them in
registers, so a matrix-vector product reads 0.5 byte per weight instead of the 4 bytes
of a float32 matrix. What it takes, checked on torch 2.13:

- the weight as ``_convert_weight_to_int4pack_for_cpu(codes int32 (N, K), 1)``: uint8
  (N, K/2) in a nibble order of its own that depends on the CPU's vector width (AVX2 and
  AVX512 differ), so it is built on this machine at load and never stored; N must be a
  multiple of 16 (we pad rows);
- ``qScaleAndZeros`` (K/group, N, 2) in the activation dtype; a weight is dequantized as
  ``(code - 8) * scale + zero``;
- group sizes 32, 64, 128, 256 (all the layout holds), a contiguous activation matrix.

Only bfloat16 activations are vectorized on AVX2 (float32 and float16 run the kernel's
non-vectorized loop), and the output is bfloat16, so the path is taken for bfloat16
activations only. Our schemes map
onto ``(code - 8) * scale + zero`` exactly in real numbers:

- ``int4``      value = (code - 8) * s          -> zero = 0
- ``int4-asym`` value = (code - z) * s          -> zero = (8 - z) * s
- ``int4-min``  value = code * s + m            -> zero = m + 8 * s

The scale and zero are rounded to bfloat16 (imported fp16 scales lose three bits), the
same order of error as the reference's rounding of each dequantized weight to bfloat16;
the kernel accumulates in float32 and rounds the output to bfloat16 as F.linear does.
``selfcheck.error_bound`` holds both to one derived bound (tests/test_cpu_kernels.py).

Schemes not in :data:`SCHEMES` (int8, and any scheme added later) are not prepacked and
run through the reference: ``_weight_int8pack_mm`` takes one scale per output row, not per
group, so it cannot hold our group-wise int8 exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..quant import layout
from ..quant.layout import QuantSpec
from ..quant.quantize import QuantizedWeight

# the Python binding skips torch.ops' dispatch wrapper: about 2 us of a 10 us call
_int4pack_mm = getattr(torch, "_weight_int4pack_mm_for_cpu",
                       torch.ops.aten._weight_int4pack_mm_for_cpu)
SCHEMES = ("int4", "int4-asym", "int4-min")  # explicit allow-list: anything else -> reference
DTYPES = (torch.bfloat16,)  # activation dtypes the op runs vectorized
GROUP_SIZES = (32, 64, 128, 256)  # what the op accepts as qGroupSize
ROW_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu needs N % 16 == 0
PACKED_DTYPE = torch.bfloat16  # of qScaleAndZeros: must equal the activation dtype
PREPACKED_PARTS = ("cpu_weight", "cpu_scales_zeros")


def supports(spec: QuantSpec) -> bool:
    """Whether weights of ``spec`` can be prepacked for the CPU int4 kernel."""
    return spec.scheme in SCHEMES and spec.group_size in GROUP_SIZES


def padded_rows(out_features: int) -> int:
    return -(-out_features // ROW_MULTIPLE) * ROW_MULTIPLE


def prepacked_shapes(spec: QuantSpec, out_features: int,
                     in_features: int) -> Dict[str, Tuple[tuple, torch.dtype]]:
    """Shape and dtype of the prepacked parts of an (N, K) weight ({} if unsupported)."""
    if not supports(spec):
        return {}
    rows, padded = padded_rows(out_features), spec.padded_in(in_features)
    return {"cpu_weight": ((rows, padded // 2), torch.uint8),
            "cpu_scales_zeros": ((padded // spec.group_size, rows, 2), PACKED_DTYPE)}


@dataclass
class PrepackedWeight(QuantizedWeight):
    """A quantized weight plus its CPU kernel form, built once when it is loaded.

    The stored components stay (the reference and the copies read them); the prepacked
    parts are extra host bytes, counted by :attr:`prepacked_nbytes`.
    """

    cpu_weight: Optional[torch.Tensor] = None  # uint8 (N16, padded_in / 2), torch's order
    cpu_scales_zeros: Optional[torch.Tensor] = None  # bf16 (groups, N16, 2)

    @property
    def prepacked_nbytes(self) -> int:
        parts = (self.cpu_weight, self.cpu_scales_zeros)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def is_prepacked(weight) -> bool:
    return isinstance(weight, PrepackedWeight) and weight.cpu_weight is not None


def prepacked_parts(weight: QuantizedWeight) -> Dict[str, torch.Tensor]:
    """The prepacked parts (cpu_weight, cpu_scales_zeros) of a supported weight."""
    spec = weight.spec
    if not supports(spec):
        raise ValueError(f"scheme {spec.scheme} g{spec.group_size} has no CPU int4 form")
    rows = padded_rows(weight.out_features)
    extra = rows - weight.out_features
    codes = layout.unpack_int4(weight.qweight).to(torch.int32)  # (N, padded_in)
    scales = weight.scales.to(torch.float32)  # (N, G)
    if spec.scheme == "int4":
        zeros = torch.zeros_like(scales)
    elif spec.scheme == "int4-asym":
        zeros = (layout.INT4_SYMMETRIC_OFFSET - weight.zeros.to(torch.float32)) * scales
    else:  # int4-min
        zeros = weight.mins.to(torch.float32) + layout.INT4_SYMMETRIC_OFFSET * scales
    if extra:  # padding rows: scale and zero 0, so they compute 0 and are sliced off
        codes = F.pad(codes, (0, 0, 0, extra))
        scales, zeros = F.pad(scales, (0, 0, 0, extra)), F.pad(zeros, (0, 0, 0, extra))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
    scales_zeros = torch.stack((scales, zeros), dim=-1).transpose(0, 1)  # (G, N16, 2)
    return {"cpu_weight": packed, "cpu_scales_zeros": scales_zeros.to(PACKED_DTYPE).contiguous()}


def prepack(weight: QuantizedWeight) -> QuantizedWeight:
    """``weight`` with its CPU kernel form; unchanged when its scheme has none."""
    if not supports(weight.spec) or weight.qweight.device.type != "cpu":
        return weight
    return PrepackedWeight(weight.qweight, weight.scales, weight.zeros, weight.spec,
                           weight.out_features, weight.in_features, mins=weight.mins,
                           **prepacked_parts(weight))


def prepack_into(source: QuantizedWeight, target: PrepackedWeight) -> None:
    """Fill ``target``'s prepacked views (carved in an arena) from ``source``."""
    for name, tensor in prepacked_parts(source).items():
        getattr(target, name).copy_(tensor)


def accepts(x: torch.Tensor, weight) -> bool:
    """Whether :func:`int4pack_linear` runs this input on a prepacked weight."""
    return (x.dtype in DTYPES and x.device.type == "cpu" and x.numel() > 0
            and is_prepacked(weight))


def int4pack_linear(x: torch.Tensor, weight: QuantizedWeight,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ dequant(W).T + bias with torch's CPU int4 kernel, x bfloat16 (..., K).

    The runtime prepacks at load; a plain weight is prepacked here on every call (for
    tests and tools only).
    """
    if not is_prepacked(weight):
        weight = prepack(weight)
        if not is_prepacked(weight):
            raise ValueError(f"scheme {weight.spec.scheme} has no CPU int4 form")
    spec, in_features, out_features = weight.spec, weight.in_features, weight.out_features
    rows = x.reshape(-1, in_features)  # (M, K)
    if in_features % spec.group_size:
        rows = F.pad(rows, (0, spec.padded_in(in_features) - in_features))
    y = _int4pack_mm(rows if rows.is_contiguous() else rows.contiguous(), weight.cpu_weight,
                     spec.group_size, weight.cpu_scales_zeros)
    if y.shape[1] != out_features:
        y = y[:, :out_features]
    if bias is not None:
        y = y + bias
    # at batch 1 every microsecond of this function is a few percent of a CPU decode step
    return y.view(x.shape[:-1] + (out_features,)) if y.is_contiguous() else y.reshape(
        x.shape[:-1] + (out_features,))
