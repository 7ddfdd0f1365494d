"""What the planner needs to know about a model: shapes only, no weights.

Read from a quantized directory (its manifest and config.json) or from a bare Hugging
Face config.json, so a user can plan before downloading a 65 GB checkpoint. The linear
shapes come from the same empty skeleton the converter and the runtime use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

import torch

from . import architecture
from .errors import ConfigError, SourceError
from .format import MANIFEST_NAME, read_manifest
from .layout import QuantSpec


@dataclass(frozen=True)
class LinearShape:
    """One quantized linear, in execution order."""

    name: str  # module name, e.g. "model.layers.0.mlp.up_proj"
    out_features: int
    in_features: int
    is_lm_head: bool


@dataclass
class ModelShape:
    """What the planner needs to know about a model: shapes only, no weights."""

    source: str  # the path planned
    model_type: str  # e.g. "qwen2"
    spec: QuantSpec  # the directory's scheme, or the one asked for
    quantized: bool  # True for a directory written by `quantize`
    linears: List[LinearShape]  # every quantized linear, in execution order
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    kv_heads: int
    head_dim: int
    max_positions: Optional[int]  # max_position_embeddings, when the config gives it
    tied_embeddings: bool  # lm_head shares the (dense) embedding
    other_dense_elements: int  # norms, biases... kept dense besides the embedding
    host_dense_bytes: int  # embedding + other dense tensors as stored on the host

    @property
    def embedding_elements(self) -> int:
        return self.vocab_size * self.hidden_size


def describe_model(path: Union[str, Path], spec: Optional[QuantSpec] = None) -> ModelShape:
    """Shapes of the model at ``path``: a quantized directory, an HF directory or config.json.

    ``spec`` is the scheme to plan for; a quantized directory has its own, and asking
    for another one is an error.
    """
    path = Path(path)
    hf_config, manifest = _read_config(path)
    if manifest is not None:
        if spec is not None and spec != manifest.spec:
            raise ConfigError(
                f"{path} is quantized as {manifest.scheme} g{manifest.group_size}; plan it "
                f"without --scheme/--group-size, or plan the source config.json for "
                f"{spec.scheme} g{spec.group_size}")
        spec = manifest.spec
    spec = spec or QuantSpec()
    text = architecture.text_config(hf_config)
    model = architecture.build_skeleton(hf_config)
    found = architecture.find_linears(model, hf_config)
    linears = [LinearShape(n, i.out_features, i.in_features, i.is_lm_head)
               for n, i in found.items()]
    embedding = model.get_input_embeddings().weight
    # The skeleton is not tied yet: a tied lm_head still has its own meta weight.
    embeddings = {id(embedding), id(model.get_output_embeddings().weight)}
    weight_names = {f"{name}.weight" for name in found}
    other = sum(p.numel() for name, p in model.named_parameters()
                if name not in weight_names and id(p) not in embeddings)
    heads = text.num_attention_heads
    if manifest is not None:
        roles = manifest.bytes_by_role()
        host_dense = sum(b for role, b in roles.items() if role not in ("linear", "lm_head"))
    else:
        source_dtype = getattr(text, "dtype", None) or getattr(text, "torch_dtype", None)
        itemsize = source_dtype.itemsize if isinstance(source_dtype, torch.dtype) else 2
        host_dense = (embedding.numel() + other) * itemsize
    return ModelShape(
        source=str(path), model_type=str(getattr(hf_config, "model_type", "?")), spec=spec,
        quantized=manifest is not None, linears=linears,
        vocab_size=embedding.shape[0], hidden_size=embedding.shape[1],
        intermediate_size=int(getattr(text, "intermediate_size", 4 * embedding.shape[1])),
        num_layers=text.num_hidden_layers,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        max_positions=getattr(text, "max_position_embeddings", None),
        tied_embeddings=architecture.ties_embeddings(hf_config),
        other_dense_elements=other, host_dense_bytes=host_dense,
    )


def _read_config(path: Path):
    """(transformers config, manifest or None) for a directory or a config.json file."""
    from transformers import AutoConfig

    if path.suffix == ".gguf":
        raise ConfigError(f"{path}: plan reads config.json, not GGUF; convert it first with "
                          "`offload-engine quantize`, or plan the original model's config.json")
    if path.is_file():
        config_path, manifest = path, None
    elif path.is_dir():
        config_path = path / "config.json"
        manifest = read_manifest(path) if (path / MANIFEST_NAME).is_file() else None
    else:
        raise SourceError(f"{path}: no such file or directory; give a quantized directory, a "
                          "Hugging Face model directory or its config.json")
    if not config_path.is_file():
        raise SourceError(f"{path}: no config.json; give a Hugging Face model directory or "
                          "the path of its config.json")
    try:
        return AutoConfig.from_pretrained(config_path), manifest
    except (OSError, ValueError, KeyError) as exc:
        raise SourceError(f"{config_path}: not a config.json transformers can read ({exc})") \
            from exc


