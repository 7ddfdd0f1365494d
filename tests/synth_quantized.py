"""A quantized directory of random INT4 codes, written directly (no source, no quantizing).

Tests that need a model of a few hundred MB (memory bounds) cannot afford to write
and quantize a bf16 source of four times that size on a shared CPU; random codes and
small scales exercise the same load, stream and read paths.
"""

from __future__ import annotations

from pathlib import Path

import torch

from offload_engine.checkpoint.convert import ShardWriter
from offload_engine.checkpoint.format import MANIFEST_NAME, Manifest, TensorEntry
from offload_engine.model import architecture
from offload_engine.quant.layout import QuantSpec
from offload_engine.quant.quantize import QuantizedWeight


def synth_config(layers: int, hidden: int = 1024, intermediate: int = 4096):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                       vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=0, pad_token_id=0)


def random_weight(spec: QuantSpec, out_features: int, in_features: int,
                  generator: torch.Generator) -> QuantizedWeight:
    parts = {}
    for part, (shape, dtype) in spec.component_shapes(out_features, in_features).items():
        if part == "scales":
            parts[part] = (torch.rand(shape, generator=generator) * 0.004 + 0.001).to(dtype)
        else:
            parts[part] = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    return QuantizedWeight.from_parts(parts, spec, out_features, in_features)


def write_synthetic(directory: Path, config, tokenizer_dir: Path,
                    spec: QuantSpec = QuantSpec("int4", 128),
                    shard_bytes: int = 64 * 1024**2, seed: int = 0) -> Path:
    """Write a loadable quantized directory for ``config`` with random weights."""
    directory = Path(directory)
    directory.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    skeleton = architecture.build_skeleton(config)
    linears = architecture.find_linears(skeleton, config)
    writer = ShardWriter(directory, shard_bytes)
    manifest = Manifest(spec.scheme, spec.group_size, source={"kind": "synthetic"})
    for name, info in linears.items():
        weight = random_weight(spec, info.out_features, info.in_features, generator)
        components = {part: writer.add(f"{name}.weight.{part}", value)
                      for part, value in weight.components().items()}
        manifest.tensors[f"{name}.weight"] = TensorEntry(
            "lm_head" if info.is_lm_head else "linear",
            [info.out_features, info.in_features], "BF16", components)
    linear_weights = {f"{name}.weight" for name in linears}
    for name, param in skeleton.named_parameters():
        if name in linear_weights:
            continue
        role = architecture.dense_role(skeleton, name)
        value = (torch.ones(param.shape) if role == "norm"
                 else torch.randn(param.shape, generator=generator) * 0.02).to(torch.bfloat16)
        manifest.tensors[name] = TensorEntry(role, list(param.shape), "BF16",
                                             {"dense": writer.add(name, value)})
    writer.flush()
    manifest.shards = dict(writer.shards)
    (directory / MANIFEST_NAME).write_text(manifest.to_json())
    config.save_pretrained(directory)
    for path in Path(tokenizer_dir).iterdir():
        (directory / path.name).write_bytes(path.read_bytes())
    return directory
