"""A Hugging Face model directory with unquantized (bf16/fp16/fp32) safetensors weights."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Iterator, List, Tuple

import torch

from ...errors import SourceError
from .. import stfile
from ..hfconfig import quantization_settings, read_hf_config

logger = logging.getLogger(__name__)

SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
FLOAT_DTYPES = ("BF16", "F16", "F32")


class SafetensorsSource:
    """A Hugging Face model directory with config.json and *.safetensors shards."""

    kind = "safetensors"
    import_spec = None  # every linear is quantized by us

    def __init__(self, directory: Path, requantize: bool = False):
        self.path = Path(directory)
        self.shards = sorted(self.path.glob("*.safetensors"))
        if not self.shards:
            raise SourceError(
                f"{self.path}: no *.safetensors files here; pass a Hugging Face model directory "
                "with safetensors weights, or a .gguf file (convert .bin checkpoints to "
                "safetensors first)"
            )
        self.config = read_hf_config(self.path, SourceError,
                                     fix="copy it from the model's repository")
        self._check_quantization()
        self.headers = [(shard, stfile.read_header(shard)) for shard in self.shards]

    def tensor_list(self) -> List[Tuple[str, str, tuple, int]]:
        """(name, dtype, shape, nbytes) of every tensor, in file order."""
        return [
            (key, info.dtype_name, info.shape, info.nbytes)
            for _, header in self.headers
            for key, info in header.items()
        ]

    def iter_tensors(self) -> Iterator[Tuple[str, torch.Tensor]]:
        for shard, header in self.headers:
            for key, info in header.items():
                if info.dtype_name not in FLOAT_DTYPES:
                    raise SourceError(
                        f"{shard}: tensor {key!r} has dtype {info.dtype_name}; only bf16, fp16 "
                        "and fp32 checkpoints are supported (dequantize pre-quantized models "
                        "first)"
                    )
                yield key, stfile.read_tensor(shard, info)

    def write_side_files(self, destination: Path) -> None:
        for name in SIDE_FILES:
            if (self.path / name).is_file():
                shutil.copy2(self.path / name, destination / name)

    def _check_quantization(self) -> None:
        _refuse_prequantized(self.path)  # sources of pre-quantized formats override this

    def _write_side_files_unquantized(self, destination: Path) -> None:
        """The side files, config.json without its quantization_config: for the sources of
        pre-quantized formats, whose import holds our own format (transformers would try
        to load the directory as theirs)."""
        SafetensorsSource.write_side_files(self, destination)
        config_path = destination / "config.json"
        config = json.loads(config_path.read_text())
        config.pop("quantization_config", None)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))

    @property
    def source_format(self) -> str:
        dtypes = sorted({info.dtype_name for _, h in self.headers for info in h.values()})
        return f"safetensors {'/'.join(dtypes)}"

    @classmethod
    def claims(cls, path: Path) -> bool:
        return path.is_dir() and any(path.glob("*.safetensors"))


def _refuse_prequantized(path: Path) -> None:
    """Say before any work that a pre-quantized directory of a method no importer claims
    (see sources/__init__.py) cannot be read, rather than failing on its first int32 tensor."""
    quantization, where = quantization_settings(path)
    if quantization:
        method = quantization.get("quant_method", "unknown")
        raise SourceError(
            f"{path}: {where} says the weights are already quantized (quant_method "
            f"{method!r}); importing {method} checkpoints is not supported (AWQ, GPTQ and "
            "GGUF Q4_0/Q4_1/Q8_0 are: docs/import.md). Convert the unquantized original instead")
