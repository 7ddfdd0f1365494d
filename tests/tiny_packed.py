"""Tiny AWQ and GPTQ checkpoints, packed by the published layouts (tests only).

The packers here are written from the formats' own sources, independently of the
unpackers under test (offload_engine/quant/awq_pack.py, gptq_pack.py):

- AWQ GEMM: AutoAWQ ``awq/modules/linear/gemm.py`` ``WQLinear_GEMM.from_linear``:
  intweight (K, N); ``order_map = [0, 2, 4, 6, 1, 3, 5, 7]``; for each word ``col`` and
  nibble i, ``qweight[:, col] |= intweight[:, col * 8 + order_map[i]] << (i * 4)``;
  qzeros packed the same way from zeros (K / group, N); scales fp16 (K / group, N).
  vLLM's ``awq_triton.py`` / GPTQModel's ``packing_utils.py`` unpack it with the
  inverse order [0, 4, 1, 5, 2, 6, 3, 7].
- GPTQ: AutoGPTQ ``nn_modules/qlinear/qlinear_cuda_old.py`` ``QuantLinear.pack``:
  qweight (K / 8, N), row r = sum_j intweight[8r + j] << 4j (packed along the input
  dim); ``zeros -= 1`` (v1), then qzeros (K / group, N / 8), word c = sum_j
  zeros[:, 8c + j] << 4j (packed along the output dim); g_idx = k // group. GPTQModel's
  v2 format (``checkpoint_format: gptq_v2``) stores the zeros without the -1
  (``convert_gptq_v1_to_v2_format``; vLLM PR 26092 describes both).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

AWQ_ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]
LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def packable_config(tied: bool = True, group_size: int = 128):
    """A tiny Qwen2 whose linear input sizes are multiples of every group size tested."""
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                       max_position_embeddings=256, initializer_range=0.3, bos_token_id=1,
                       eos_token_id=0, pad_token_id=0, tie_word_embeddings=tied)


def rtn_asym(weight: torch.Tensor, group_size: int, min_zero: int = 0):
    """Round-to-nearest int4 with zero points: codes (N, K), zeros (N, G), fp16 scales (N, G)."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, -1, group_size)
    low = groups.amin(-1).clamp(max=0)
    high = groups.amax(-1).clamp(min=0)
    scales = ((high - low) / 15).clamp(min=1e-4).to(torch.float16)
    zeros = torch.round(-low / scales.float()).clamp(min_zero, 15)
    codes = (torch.round(groups / scales.float().unsqueeze(-1)) + zeros.unsqueeze(-1)).clamp(0, 15)
    return codes.reshape(out_features, in_features).long(), zeros.long(), scales


def decompressed(codes, zeros, scales, group_size: int) -> torch.Tensor:
    """(code - zero) * scale in float32: the weight the checkpoint means."""
    out_features = codes.shape[0]
    groups = codes.reshape(out_features, -1, group_size).float() - zeros.float().unsqueeze(-1)
    return (groups * scales.float().unsqueeze(-1)).reshape(out_features, -1)


def _words(nibbles: np.ndarray) -> torch.Tensor:
    """uint32 words from (..., 8) nibbles, nibble i at shift 4i, as int32 (the stored dtype)."""
    shifted = nibbles.astype(np.uint32) << (4 * np.arange(8, dtype=np.uint32))
    return torch.from_numpy(np.bitwise_or.reduce(shifted, axis=-1).view(np.int32).copy())


def pack_awq(codes, zeros, scales) -> dict:
    """AutoAWQ GEMM tensors of one linear from codes (N, K), zeros/scales (N, G)."""
    intweight = codes.t().numpy()  # (K, N)
    izeros = zeros.t().numpy()  # (G, N)

    def pack(columns):
        rows, cols = columns.shape
        # word col, nibble i <- column col * 8 + order_map[i]
        return _words(columns.reshape(rows, cols // 8, 8)[..., AWQ_ORDER_MAP])

    return {"qweight": pack(intweight), "qzeros": pack(izeros),
            "scales": scales.t().contiguous()}


def pack_gptq(codes, zeros, scales, group_size: int, version: int = 1, g_idx=None) -> dict:
    """AutoGPTQ (v1) or GPTQModel v2 tensors of one linear from codes (N, K)."""
    intweight = codes.t().numpy()  # (K, N)
    in_features, out_features = intweight.shape
    # word r, nibble j <- input row 8r + j
    qweight = _words(intweight.reshape(in_features // 8, 8, out_features).transpose(0, 2, 1))
    stored = zeros.t().numpy() - (1 if version == 1 else 0)  # (G, N)
    qzeros = _words(stored.reshape(stored.shape[0], -1, 8))
    if g_idx is None:
        g_idx = torch.arange(in_features, dtype=torch.int32) // group_size
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales.t().contiguous(),
            "g_idx": g_idx.to(torch.int32)}


def write_checkpoint(directory: Path, fmt: str, tokenizer_dir: Path, group_size: int = 128,
                     tied: bool = True, version: int = 1, act_order: bool = False,
                     seed: int = 0):
    """Write a packed AWQ/GPTQ directory; return it and {linear weight: decompressed (N, K)}."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    config = packable_config(tied)
    model = AutoModelForCausalLM.from_config(config).float()
    tensors, dense = {}, {}
    for key, value in model.state_dict().items():
        module = key.rsplit(".", 1)[0]
        if not (key.endswith(".weight") and module.endswith(LINEAR_SUFFIXES)):
            tensors[key] = value.to(torch.float16).contiguous()
            continue
        codes, zeros, scales = rtn_asym(value, group_size,
                                        min_zero=1 if fmt == "gptq" and version == 1 else 0)
        dense[key] = decompressed(codes, zeros, scales, group_size)
        if fmt == "awq":
            parts = pack_awq(codes, zeros, scales)
        else:
            g_idx = None
            if act_order:
                perm = torch.randperm(codes.shape[1])
                g_idx = torch.empty_like(perm)
                g_idx[perm] = torch.arange(codes.shape[1]) // group_size
            parts = pack_gptq(codes, zeros, scales, group_size, version, g_idx)
        tensors.update({f"{module}.{name}": part for name, part in parts.items()})
    if tied:
        tensors.pop("lm_head.weight", None)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config.quantization_config = _quant_config(fmt, group_size, version, act_order)
    config.save_pretrained(directory)
    GenerationConfig(bos_token_id=1, eos_token_id=0, pad_token_id=0).save_pretrained(directory)
    for path in Path(tokenizer_dir).iterdir():
        (directory / path.name).write_bytes(path.read_bytes())
    return directory, dense


MOE_EXPERT_SUFFIXES = ("w1", "w2", "w3")  # Mixtral's expert linears (block_sparse_moe)


def pack_checkpoint(src: Path, dst: Path, fmt: str, group_size: int = 32, version: int = 1):
    """Pack every linear of the saved dense checkpoint SRC (per-expert keys, as hub MoE
    checkpoints keep them) into the AWQ/GPTQ directory DST, routers left in float as
    the quantizers leave them. Returns {linear weight key: decompressed float32 (N, K)}."""
    from safetensors.torch import load_file, save_file

    state = {}
    for shard in sorted(Path(src).glob("*.safetensors")):
        state.update(load_file(shard))
    tensors, dense = {}, {}
    for key, value in state.items():
        module = key.rsplit(".", 1)[0]
        linear = module.endswith(LINEAR_SUFFIXES + MOE_EXPERT_SUFFIXES) or module == "lm_head"
        if not (key.endswith(".weight") and linear):
            tensors[key] = value
            continue
        codes, zeros, scales = rtn_asym(value.float(), group_size,
                                        min_zero=1 if fmt == "gptq" and version == 1 else 0)
        dense[key] = decompressed(codes, zeros, scales, group_size)
        parts = (pack_awq(codes, zeros, scales) if fmt == "awq"
                 else pack_gptq(codes, zeros, scales, group_size, version))
        tensors.update({f"{module}.{name}": part for name, part in parts.items()})
    dst = Path(dst)
    dst.mkdir(parents=True)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for path in Path(src).iterdir():
        if path.suffix != ".safetensors" and path.name != "model.safetensors.index.json":
            (dst / path.name).write_bytes(path.read_bytes())
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = _quant_config(fmt, group_size, version, False)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dense


def _quant_config(fmt: str, group_size: int, version: int, act_order: bool) -> dict:
    if fmt == "awq":  # as AutoAWQ writes it
        return {"quant_method": "awq", "bits": 4, "group_size": group_size,
                "zero_point": True, "version": "gemm", "modules_to_not_convert": None}
    return {"quant_method": "gptq", "bits": 4, "group_size": group_size, "sym": False,
            "desc_act": act_order, "checkpoint_format": "gptq" if version == 1 else "gptq_v2"}


def set_config_field(directory: Path, **fields) -> None:
    """Change quantization_config fields of a written checkpoint (for refusal tests)."""
    path = Path(directory) / "config.json"
    data = json.loads(path.read_text())
    data["quantization_config"].update(fields)
    path.write_text(json.dumps(data))


def move_settings_to_side_file(directory: Path) -> dict:
    """Rewrite a written checkpoint as the quantizers did before their transformers
    integration: no quantization_config in config.json, the settings in the quantizer's
    own file (AutoGPTQ quantize_config.json; AutoAWQ quant_config.json with its own
    names, e.g. {"zero_point": true, "q_group_size": 128, "w_bit": 4, "version": "GEMM"}).
    Returns the settings written."""
    path = Path(directory) / "config.json"
    data = json.loads(path.read_text())
    quantization = data.pop("quantization_config")
    path.write_text(json.dumps(data))
    if quantization["quant_method"] == "awq":
        settings = {"zero_point": quantization["zero_point"],
                    "q_group_size": quantization["group_size"],
                    "w_bit": quantization["bits"], "version": "GEMM"}
        name = "quant_config.json"
    else:  # AutoGPTQ's BaseQuantizeConfig fields; quant_method is absent in older files
        settings = {"bits": quantization["bits"], "group_size": quantization["group_size"],
                    "damp_percent": 0.01, "desc_act": quantization["desc_act"],
                    "static_groups": False, "sym": quantization["sym"],
                    "true_sequential": True, "model_name_or_path": None,
                    "model_file_base_name": "model",
                    "checkpoint_format": quantization["checkpoint_format"]}
        name = "quantize_config.json"
    (Path(directory) / name).write_text(json.dumps(settings))
    return settings
