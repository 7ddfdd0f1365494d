"""A tiny gpt-oss checkpoint with MXFP4 experts, as OpenAI ships gpt-oss (tests only).

The experts are quantized by gguf-py's own MXFP4 quantizer (``gguf.quants.quantize``,
GGUF's block: an e8m0 byte, then element i < 16 in the low nibble of byte i and i + 16 in
the high one), then laid out as gpt-oss stores them (transformers'
``integrations/mxfp4.py``, ``convert_moe_packed_tensors``: ``*_blocks`` (E, N, K/32, 16)
with element 2j in the low nibble of byte j and 2j + 1 in the high one, ``*_scales``
(E, N, K/32) the exponents), written here in NumPy independently of
offload_engine/quant/mxfp4.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

EXPERT_MATRICES = ("gate_up_proj", "down_proj")
# what gpt-oss's config.json says (openai/gpt-oss-20b)
QUANTIZATION_CONFIG = {"quant_method": "mxfp4",
                       "modules_to_not_convert": ["model.layers.*.self_attn",
                                                  "model.layers.*.mlp.router",
                                                  "model.embed_tokens", "lm_head"]}


def gguf_blocks(matrix: np.ndarray) -> np.ndarray:
    """gguf-py's MXFP4 rows (N, K/32 * 17) of a float (N, K) matrix."""
    import gguf
    from gguf.quants import quantize

    return quantize(matrix.astype(np.float32), gguf.GGMLQuantizationType.MXFP4)


def gpt_oss_layout(rows: np.ndarray):
    """GGUF MXFP4 rows (N, G * 17) -> gpt-oss (blocks (N, G, 16), scales (N, G))."""
    n = rows.shape[0]
    blocks = rows.reshape(n, -1, 17)
    low, high = blocks[..., 1:] & 0x0F, blocks[..., 1:] >> 4
    elements = np.concatenate([low, high], axis=-1)  # (N, G, 32): element i at i
    packed = elements[..., 0::2] | (elements[..., 1::2] << 4)
    return packed.astype(np.uint8), blocks[..., 0].copy()


def write_mxfp4_checkpoint(src: Path, dst: Path) -> dict:
    """DST: SRC (a dense gpt-oss directory) with its experts in MXFP4. Returns
    {fused experts key: gguf-py's dequantization (E, N, K) float32}, the rows per expert."""
    import gguf
    import torch
    from gguf.quants import dequantize
    from safetensors.torch import load_file, save_file

    state = {}
    for shard in sorted(Path(src).glob("*.safetensors")):
        state.update(load_file(shard))
    out, dequantized = {}, {}
    for key, value in state.items():
        if not key.endswith(tuple(f"experts.{m}" for m in EXPERT_MATRICES)):
            out[key] = value
            continue
        matrices = value.float().transpose(1, 2).numpy()  # (E, N, K): the blocks' rows
        rows = [gguf_blocks(m) for m in matrices]
        layout = [gpt_oss_layout(r) for r in rows]
        out[f"{key}_blocks"] = torch.from_numpy(np.stack([b for b, _ in layout]))
        out[f"{key}_scales"] = torch.from_numpy(np.stack([s for _, s in layout]))
        dequantized[key] = torch.from_numpy(np.stack(
            [dequantize(r, gguf.GGMLQuantizationType.MXFP4) for r in rows]))
    dst = Path(dst)
    dst.mkdir(parents=True)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for path in Path(src).iterdir():
        if path.suffix != ".safetensors" and path.name != "model.safetensors.index.json":
            (dst / path.name).write_bytes(path.read_bytes())
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = QUANTIZATION_CONFIG
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dequantized


def transformers_dequantized(directory: Path):
    """transformers' own load of an MXFP4 directory, dequantized (its
    ``Mxfp4Config(dequantize=True)``) into float32."""
    import torch
    from transformers import AutoModelForCausalLM, Mxfp4Config

    return AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32,
        quantization_config=Mxfp4Config(dequantize=True)).eval()
