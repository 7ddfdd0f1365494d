"""compressed-tensors checkpoints of tiny models, compressed by the compressed-tensors
library itself (its scale/zero-point rule, its quantizer, its int32 packer and its
config schema), the way llm-compressor saves a W4A16 model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


def scheme_for(strategy: str, symmetric: bool, group_size: int | None):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy=strategy,
                            group_size=group_size if strategy == "group" else None)
    return QuantizationScheme(targets=["Linear"], weights=args)


def _qparams(weight: torch.Tensor, args):
    """The library's own scale and zero point for a min/max observer."""
    from compressed_tensors.quantization.utils import calculate_qparams

    rows = weight.shape[0]
    size = args.group_size if args.strategy == "group" else weight.shape[1]
    grouped = weight.reshape(rows, -1, size)
    return calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)


def make_ct_checkpoint(src: Path, dst: Path, strategy: str = "group", symmetric: bool = True,
                       group_size: int | None = 32, dtype=torch.bfloat16) -> Path:
    """Compress every Linear of the dense checkpoint SRC into DST (pack-quantized)."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file, save_file

    scheme = scheme_for(strategy, symmetric, group_size)
    dst.mkdir(parents=True)
    config = json.loads((src / "config.json").read_text())
    tied = config.get("tie_word_embeddings", False)
    state = {}
    for shard in sorted(src.glob("*.safetensors")):
        state.update(load_file(shard))
    out = {}
    for key, tensor in state.items():
        # Mixtral's experts are w1/w2/w3; routers (mlp.gate) stay dense, as llm-compressor
        # recipes leave them
        linear = (key.endswith(("proj.weight", ".w1.weight", ".w2.weight", ".w3.weight"))
                  or (key == "lm_head.weight" and not tied))
        if not linear:
            out[key] = tensor
            continue
        weight = tensor.to(dtype)
        scale, zero = _qparams(weight, scheme.weights)
        parts = {"weight": weight, "weight_scale": scale.to(dtype),
                 "weight_zero_point": zero.to(torch.int8)}
        module = key[:-len(".weight")]
        for part, value in PackedQuantizationCompressor.compress(parts, scheme).items():
            out[f"{module}.{part}"] = value.contiguous()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for path in src.iterdir():
        if path.suffix != ".safetensors" and path.name != "model.safetensors.index.json":
            shutil.copy2(path, dst / path.name)
    qconfig = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                                 quantization_status="compressed")
    config["quantization_config"] = {"quant_method": "compressed-tensors",
                                     **qconfig.model_dump(exclude=["quant_method"])}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def decompress_module(directory: Path, module: str, float32: bool = False) -> torch.Tensor:
    """The library's decompression of one module's weight, from DIRECTORY's files.

    The library computes in the scale dtype; ``float32`` hands it the scales widened
    (exactly) to float32, so it computes the exact products (q - zero) * scale.
    """
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors import safe_open

    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    scheme = next(iter(QuantizationConfig.model_validate(config).config_groups.values()))
    state = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(shard, "pt") as file:
            state.update({k[len(module) + 1:]: file.get_tensor(k) for k in file.keys()
                          if k.startswith(module + ".")})
    if float32:
        state["weight_scale"] = state["weight_scale"].float()
    return PackedQuantizationCompressor.decompress(state, scheme)["weight"]
