"""Checkpoints we convert from, one module per format, picked by a registry.

Every source answers the same questions: is this path mine (``claims``)? which tensors
(``tensor_list``)? and, one at a time (``iter_tensors``), either a float tensor for us
to quantize or, when the file already holds codes our layout can represent
(``import_spec`` is not None), a QuantizedWeight copied exactly. An importing source
lists in ``requantized`` the linears it yields as float all the same (an AWQ float
``lm_head``, a GGUF's F16 output matrix): convert quantizes them with ``import_spec``,
or with ``requantize_spec`` where a source sets one (a GGUF whose main type is a raw-block
scheme, which we never quantize to). A source may yield weights of several specs (a
GGUF Q4_K_M file); the manifest names each tensor's.
Each also writes its config and tokenizer files beside ours (``write_side_files``) and
names its format (``source_format``) for the manifest.

A source that cannot import its weights exactly says so when it is opened, before any
work starts, unless ``requantize`` asks for the lossy road explicitly.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import SourceError
from .awq import AWQSource
from .compressed_tensors import CompressedTensorsSource
from .dense import SIDE_FILES, SafetensorsSource
from .gguf import GGUFSource
from .gptq import GPTQSource
from .mxfp4 import MXFP4Source

__all__ = ["GGUFSource", "SIDE_FILES", "SafetensorsSource", "open_source"]

# Directory sources recognised by config.json's quantization_config, tried in order.
PACKED_SOURCES = (
    CompressedTensorsSource,
    AWQSource,
    GPTQSource,
    MXFP4Source,
)


def open_source(src: Path, requantize: bool = False):
    """Open SRC as a safetensors directory or a GGUF file, with a clear error otherwise."""
    src = Path(src)
    if not src.exists():
        raise SourceError(f"{src}: no such file or directory")
    if src.is_file():
        if not GGUFSource.claims(src):
            raise SourceError(f"{src}: a file source must be a .gguf; pass a directory otherwise")
        return GGUFSource(src, requantize)
    ggufs = sorted(src.glob("*.gguf"))
    if not SafetensorsSource.claims(src) and len(ggufs) == 1:
        return GGUFSource(ggufs[0], requantize)
    if not SafetensorsSource.claims(src) and len(ggufs) > 1:
        raise SourceError(f"{src}: several .gguf files here; pass the one to convert")
    for source in PACKED_SOURCES:
        if source.claims(src):
            return source(src, requantize)
    return SafetensorsSource(src, requantize)
