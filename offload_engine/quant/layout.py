"""The one definition of how quantized weights are laid out in memory.

The quantizer, the reference dequantizer, the checkpoint format and every kernel
read these constants and helpers; nothing else may assume a nibble order.

A weight W of shape (out_features N, in_features K) is quantized in groups of
``group_size`` consecutive elements along K (the input dimension). K is padded
with zeros up to ``padded_in = ceil(K / group_size) * group_size``.

Components of a quantized weight:

- ``qweight``:
    * int4 schemes: uint8 (N, padded_in // 2). Byte j of a row holds element 2j in
      its low nibble and element 2j + 1 in its high nibble. Nibbles are unsigned
      codes 0..15. For ``int4`` (symmetric) the signed value is code - 8, so the
      range is -8..7 and we quantize to -7..7 (the scale is absmax / 7).
      For ``int4-asym`` the value is code - zero; for ``int4-min`` it is the code itself.
    * int8: int8 (N, padded_in), signed values -127..127 (scale is absmax / 127).
- ``scales``: (N, padded_in // group_size), one scale per group, in the spec's scale
  dtype: bfloat16 for weights we quantize, float16 for imported ones (GGUF, AWQ, GPTQ
  store fp16 scales; rounding them to bf16 would break exactness).
- ``zeros`` (``int4-asym`` only): uint8 (N, padded_in // group_size), zero point
  codes 0..15.
- ``mins`` (``int4-min`` only): (N, padded_in // group_size) in the scale dtype, a float
  offset per group. GGUF Q4_1 (and Q4_K) store ``q * d + m``; an integer zero point
  cannot hold ``m`` exactly, a float minimum can.

Dequantized value, computed in float32: (value - zero) * scale for int4/int4-asym/int8,
code * scale + min for int4-min (multiply, then add: the order gguf-py uses, so an
imported Q4_1 block dequantizes bit for bit as ``gguf.quants.dequantize`` does).

Raw-block schemes (``gguf-q2_k``, ``gguf-q3_k``, ``gguf-q4_k``, ``gguf-q5_k``,
``gguf-q6_k``, ``gguf-q5_0``, ``gguf-q5_1``, ``mxfp4``; see :mod:`.block_formats`) hold a
GGUF tensor's blocks as the file stores them (gpt-oss's MXFP4 experts as GGUF's MXFP4
blocks): qweight is uint8
(N, K / block_elements * block_bytes), there is no scales component, ``group_size`` is
the block's element count and K is a whole number of blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .block_formats import BLOCK_SCHEMES, FORMATS, BlockFormat
from .schemes import DEFAULT_GROUP_SIZE, DEFAULT_SCHEME, GROUP_SIZES, SCHEMES  # noqa: F401

# only imported checkpoints hold these: GGUF Q4_1's float minimum, GGUF raw blocks
IMPORT_SCHEMES = ("int4-min",) + BLOCK_SCHEMES
QUANTIZABLE_SCHEMES = SCHEMES + ("int4-min",)  # what quantize_weight writes
STORED_SCHEMES = SCHEMES + IMPORT_SCHEMES
SCALE_DTYPE = torch.bfloat16  # what our quantizer writes
SCALE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # manifest spelling -> dtype
DEFAULT_SCALE_DTYPE = "bf16"
# How a kernel turns codes into values, by scheme (a constexpr of the Triton kernels).
OFFSET_NONE, OFFSET_ZERO, OFFSET_MIN = 0, 1, 2
INT4_SYMMETRIC_OFFSET = 8  # code = value + 8 for symmetric int4
INT4_SYMMETRIC_MAX = 7  # quantized values use -7..7, keeping the grid symmetric
INT4_CODE_MAX = 15
INT8_MAX = 127


@dataclass(frozen=True)
class QuantSpec:
    """How a tensor is quantized: the scheme, the group size along the input dim and the
    dtype of the per-group scales (and minimums)."""

    scheme: str = DEFAULT_SCHEME  # one of STORED_SCHEMES
    group_size: int = DEFAULT_GROUP_SIZE  # elements per scale along the input dimension
    scale_dtype: str = DEFAULT_SCALE_DTYPE  # "bf16" or "fp16", a key of SCALE_DTYPES

    def __post_init__(self) -> None:
        if self.scheme not in STORED_SCHEMES:
            raise ConfigError(
                f"unknown quantization scheme {self.scheme!r}: use one of {', '.join(SCHEMES)}"
            )
        if self.scale_dtype not in SCALE_DTYPES:
            raise ConfigError(f"unknown scale dtype {self.scale_dtype!r}: use one of "
                              f"{', '.join(SCALE_DTYPES)}")
        if self.group_size not in GROUP_SIZES:
            raise ConfigError(
                f"unsupported --group-size {self.group_size}: use one of "
                f"{', '.join(map(str, GROUP_SIZES))}"
            )
        fmt = self.block_format
        if fmt is not None and (self.group_size != fmt.block_elements
                                or self.scale_dtype != "fp16"):
            raise ConfigError(f"scheme {self.scheme} holds {fmt.ggml_type} blocks: group size "
                              f"{fmt.block_elements} with fp16 scales, not g{self.group_size} "
                              f"{self.scale_dtype}")

    @property
    def block_format(self) -> BlockFormat | None:
        """The GGUF block type of a raw-block scheme, None for our own layout."""
        return FORMATS.get(self.scheme)

    @property
    def raw_blocks(self) -> bool:
        return self.scheme in FORMATS

    @property
    def bits(self) -> int:
        if self.raw_blocks:
            return self.block_format.bits
        return 8 if self.scheme == "int8" else 4

    @property
    def has_zeros(self) -> bool:
        return self.scheme == "int4-asym"

    @property
    def has_mins(self) -> bool:
        return self.scheme == "int4-min"

    @property
    def offset_mode(self) -> int:
        """OFFSET_ZERO, OFFSET_MIN or OFFSET_NONE: what is applied besides the scale."""
        if self.has_zeros:
            return OFFSET_ZERO
        return OFFSET_MIN if self.has_mins else OFFSET_NONE

    @property
    def scale_torch_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def padded_in(self, in_features: int) -> int:
        """The input dimension rounded up to a whole number of groups."""
        groups = -(-in_features // self.group_size)
        return groups * self.group_size

    def num_groups(self, in_features: int) -> int:
        return self.padded_in(in_features) // self.group_size

    def component_shapes(self, out_features: int, in_features: int) -> dict:
        """Shape and dtype of every stored component of an (N, K) weight."""
        if self.raw_blocks:
            fmt = self.block_format
            return {"qweight": ((out_features, self.num_groups(in_features) * fmt.block_bytes),
                                torch.uint8)}
        padded = self.padded_in(in_features)
        groups = padded // self.group_size
        shapes = {
            "qweight": (
                (out_features, padded // 2) if self.bits == 4 else (out_features, padded),
                torch.uint8 if self.bits == 4 else torch.int8,
            ),
            "scales": ((out_features, groups), self.scale_torch_dtype),
        }
        if self.has_zeros:
            shapes["zeros"] = ((out_features, groups), torch.uint8)
        if self.has_mins:
            shapes["mins"] = ((out_features, groups), self.scale_torch_dtype)
        return shapes

    def nbytes(self, out_features: int, in_features: int) -> int:
        """Bytes of all components of one quantized (N, K) weight."""
        total = 0
        for shape, dtype in self.component_shapes(out_features, in_features).values():
            numel = 1
            for dim in shape:
                numel *= dim
            total += numel * dtype.itemsize
        return total


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit codes (N, K_even) of any int dtype into uint8 (N, K_even // 2)."""
    codes = codes.to(torch.uint8)
    low = codes[..., 0::2]
    high = codes[..., 1::2]
    return low | (high << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 (N, K/2) -> uint8 codes (N, K)."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
