"""Checkpoints we convert from: a Hugging Face safetensors directory or a GGUF file.

A source yields its tensors one at a time (so conversion memory stays bounded for
safetensors) and knows how to write its config and tokenizer files beside ours.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Iterator, List, Tuple

import torch

from ...errors import SourceError
from .. import stfile

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

    def __init__(self, directory: Path):
        self.path = Path(directory)
        self.shards = sorted(self.path.glob("*.safetensors"))
        if not self.shards:
            raise SourceError(
                f"{self.path}: no *.safetensors files here; pass a Hugging Face model directory "
                "with safetensors weights, or a .gguf file (convert .bin checkpoints to "
                "safetensors first)"
            )
        if not (self.path / "config.json").is_file():
            raise SourceError(f"{self.path}: no config.json; copy it from the model's repository")
        from transformers import AutoConfig

        self.config = AutoConfig.from_pretrained(self.path)
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


class GGUFSource:
    """A .gguf file, read through transformers (which dequantizes it to float32).

    transformers materialises the whole model, so converting a GGUF needs about
    4 bytes per parameter of RAM; safetensors sources stream tensor by tensor.
    """

    kind = "gguf"

    def __init__(self, path: Path):
        self.path = Path(path)
        from transformers import AutoModelForCausalLM

        folder, name = str(self.path.parent), self.path.name
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                         dtype=torch.float32)
        except (ValueError, OSError, KeyError) as exc:
            raise SourceError(f"{self.path}: cannot read this GGUF file ({exc})") from exc
        self._folder, self._name = folder, name
        self.config = model.config
        self.generation_config = model.generation_config
        self.state = model.state_dict()

    def tensor_list(self) -> List[Tuple[str, str, tuple, int]]:
        return [(k, "F32", tuple(t.shape), t.numel() * 4) for k, t in self.state.items()]

    def iter_tensors(self) -> Iterator[Tuple[str, torch.Tensor]]:
        for key in list(self.state):
            yield key, self.state.pop(key)

    def write_side_files(self, destination: Path) -> None:
        from transformers import AutoTokenizer

        self.config.save_pretrained(destination)
        self.generation_config.save_pretrained(destination)
        tokenizer = AutoTokenizer.from_pretrained(self._folder, gguf_file=self._name)
        tokenizer.save_pretrained(destination)


def open_source(src: Path):
    """Open SRC as a safetensors directory or a GGUF file, with a clear error otherwise."""
    src = Path(src)
    if not src.exists():
        raise SourceError(f"{src}: no such file or directory")
    if src.is_file():
        if src.suffix.lower() != ".gguf":
            raise SourceError(f"{src}: a file source must be a .gguf; pass a directory otherwise")
        return GGUFSource(src)
    ggufs = sorted(src.glob("*.gguf"))
    if not list(src.glob("*.safetensors")) and len(ggufs) == 1:
        return GGUFSource(ggufs[0])
    if not list(src.glob("*.safetensors")) and len(ggufs) > 1:
        raise SourceError(f"{src}: several .gguf files here; pass the one to convert")
    return SafetensorsSource(src)
