"""Read safetensors files one tensor at a time, with explicit size checks.

We parse the (documented, tiny) header ourselves and read each tensor with a plain
``readinto`` instead of memory-mapping the whole shard: memory then holds exactly
the tensor asked for, and a truncated file is reported by name before any read.
Writing goes through the ``safetensors`` package.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FormatError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives inside a safetensors file."""

    key: str
    dtype_name: str  # safetensors spelling, e.g. "BF16"
    shape: tuple
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> dict:
    """Parse a safetensors header into {key: TensorInfo}; check the file is whole."""
    path = Path(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise FormatError(f"{path}: file is truncated (no safetensors header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise FormatError(f"{path}: file is truncated or not a safetensors file")
            header = json.loads(handle.read(header_len))
    except FileNotFoundError as exc:
        raise FormatError(f"{path}: file is missing") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: corrupt safetensors header ({exc})") from exc
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    infos = {}
    for key, entry in header.items():
        begin, end = entry["data_offsets"]
        infos[key] = TensorInfo(
            key, entry["dtype"], tuple(entry["shape"]), data_start + begin, data_start + end
        )
    data_end = max((info.end for info in infos.values()), default=data_start)
    if data_end > size:
        raise FormatError(
            f"{path}: file is truncated ({size} bytes, header needs {data_end}); "
            "re-download or re-convert it"
        )
    return infos


def read_tensor(path: Path, info: TensorInfo) -> torch.Tensor:
    """Read one tensor's bytes into a new CPU tensor."""
    if info.dtype_name not in DTYPES:
        raise FormatError(f"{path}: tensor {info.key!r} has unsupported dtype {info.dtype_name}")
    dtype = DTYPES[info.dtype_name]
    numel = 1
    for dim in info.shape:
        numel *= dim
    if numel * dtype.itemsize != info.nbytes:
        raise FormatError(f"{path}: tensor {info.key!r} byte range does not match its shape")
    out = torch.empty(numel, dtype=dtype)
    if info.nbytes:
        buffer = out.view(torch.uint8).numpy()
        with open(path, "rb") as handle:
            handle.seek(info.begin)
            got = handle.readinto(buffer)
        if got != info.nbytes:
            raise FormatError(f"{path}: file is truncated inside tensor {info.key!r}")
    return out.reshape(info.shape)
