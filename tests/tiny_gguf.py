"""Tiny GGUF files written the way llama.cpp's convert_hf_to_gguf.py writes a Llama.

Layout followed (llama.cpp, convert_hf_to_gguf.py ``LlamaModel``): tensor names from
gguf-py's tensor name map (``blk.N.attn_q.weight`` ...), q and k projections permuted
for llama.cpp's rotary layout (``LlamaModel.permute``: rows reshaped to
(heads, 2, head_dim / 2) and the two inner axes swapped), weights quantized with
gguf-py's own ``gguf.quants.quantize``, the tokenizer as a "gpt2" BPE vocabulary.
gguf-py (0.19) cannot quantize to the K-quants (Q6_K is the type llama.cpp gives the
output matrix of a Q4_0/Q4_1 file; Q4_K, Q5_K and Q6_K make up its Q4_K_M and Q5_K_M
files), so :func:`quantize_q6_k` and :func:`quantize_k_min` write those blocks here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch


def llama_permute(weights: np.ndarray, n_head: int, n_head_kv: Optional[int]) -> np.ndarray:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.py, LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def quantize_q6_k(values: np.ndarray) -> np.ndarray:
    """(N, K) float32, K a multiple of 256 -> (N, K / 256 * 210) uint8 Q6_K blocks.

    The block layout is gguf-py's ``Q6_K.dequantize_blocks`` read backwards (llama.cpp
    ``block_q6_K``): 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 int8
    sub-block scales, one fp16 ``d``; value = d * scale[i // 16] * (q - 32). The rounding
    is plain round-to-nearest (llama.cpp searches its scales): any valid block serves tests
    that compare with the file's own dequantized values.
    """
    rows = values.shape[0]
    sub = values.astype(np.float32).reshape(-1, 16, 16)  # (blocks, sub-blocks, 16)
    sub_scale = np.abs(sub).max(axis=-1) / 31  # (blocks, 16): q - 32 in -32..31
    d = (sub_scale.max(axis=-1) / 127).astype(np.float16)  # (blocks,)
    d32 = d.astype(np.float32)
    scales = np.round(sub_scale / np.where(d32 > 0, d32, 1)[:, None]).clip(0, 127)
    step = d32[:, None] * scales  # (blocks, 16), the effective scale as gguf-py computes it
    q = np.round(sub / np.where(step > 0, step, 1)[..., None]).clip(-32, 31) + 32
    q = q.reshape(-1, 256).astype(np.uint8)
    low = (q & 0x0F).reshape(-1, 2, 2, 64)  # element 128h + 64s + j
    high = (q >> 4).reshape(-1, 2, 4, 32)  # element 128h + 32t + j
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6))
    blocks = np.concatenate([ql, qh.reshape(-1, 64), scales.astype(np.int8).view(np.uint8),
                             d.reshape(-1, 1).view(np.uint8)], axis=1)  # (blocks, 210)
    return blocks.reshape(rows, -1)


def _k4_scale_bytes(scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """(blocks, 8) 6-bit scales and mins -> the 12 packed bytes of Q4_K/Q5_K (gguf-py's
    ``Q4_K.get_scale_min`` read backwards)."""
    low = (scales[:, :4] & 63) | ((scales[:, 4:] >> 4) << 6)
    low_m = (mins[:, :4] & 63) | ((mins[:, 4:] >> 4) << 6)
    nibbles = (scales[:, 4:] & 15) | ((mins[:, 4:] & 15) << 4)
    return np.concatenate([low, low_m, nibbles], axis=1).astype(np.uint8)


def quantize_k_min(values: np.ndarray, bits: int) -> np.ndarray:
    """(N, K) float32, K a multiple of 256 -> Q4_K (bits 4, 144 bytes per 256 elements) or
    Q5_K (bits 5, 176 bytes) blocks.

    Layout (llama.cpp ``block_q4_K``/``block_q5_K``): fp16 d, fp16 dmin, 12 bytes of 6-bit
    sub-block scales and mins, for Q5_K 32 bytes of fifth bits (bit j of byte i belongs to
    element 32j + i), then nibbles (element 64c + 32s + i is nibble s of byte 32c + i);
    value = d * scale[j] * q - dmin * min[j] for sub-block j of 32. Round to nearest over
    each sub-block's range widened to include 0 (llama.cpp searches its scales instead).
    """
    rows, top = values.shape[0], (1 << bits) - 1
    sub = values.astype(np.float32).reshape(-1, 8, 32)  # (blocks, sub-blocks, 32)
    low = np.minimum(sub.min(axis=-1), 0)
    step = (sub.max(axis=-1) - low) / top  # (blocks, 8)
    d = (step.max(axis=-1) / 63).astype(np.float16)
    dmin = (-low.min(axis=-1) / 63).astype(np.float16)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    scales = np.round(step / np.where(d32 > 0, d32, 1)).clip(0, 63).astype(np.uint8)
    mins = np.round(-low / np.where(dmin32 > 0, dmin32, 1)).clip(0, 63).astype(np.uint8)
    eff, offset = d32 * scales, dmin32 * mins  # as gguf-py computes them
    q = np.round((sub + offset[..., None]) / np.where(eff > 0, eff, 1)[..., None])
    q = q.clip(0, top).astype(np.uint8).reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] & 15) | ((q[:, :, 1] & 15) << 4)  # (blocks, 4, 32)
    parts = [d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8),
             _k4_scale_bytes(scales, mins)]
    if bits == 5:
        fifth = (q.reshape(-1, 8, 32) >> 4) & 1  # (blocks, j, i)
        parts.append((fifth << np.arange(8, dtype=np.uint8)[None, :, None]).sum(
            axis=1, dtype=np.uint8))
    parts.append(qs.reshape(-1, 128))
    return np.concatenate(parts, axis=1).reshape(rows, -1)


def quantize_iq4_nl(values: np.ndarray) -> np.ndarray:
    """(N, K) float32, K a multiple of 32 -> IQ4_NL blocks (18 bytes: fp16 d, 16 bytes of
    nibbles in Q4_0's order); value = d * kvalues[q], the non-linear grid gguf-py reads.
    Nearest grid value with d = absmax / 127 (llama.cpp searches d): a type we refuse, for
    tests of the refusal."""
    import gguf

    rows = values.shape[0]
    blocks = values.astype(np.float32).reshape(-1, 32)
    d = (np.abs(blocks).max(axis=-1) / 127).astype(np.float16)
    d32 = np.where(d > 0, d.astype(np.float32), 1)[:, None]
    grid = np.array(gguf.quants.IQ4_NL.kvalues, dtype=np.float32)
    q = np.abs(blocks[..., None] / d32[..., None] - grid).argmin(axis=-1).astype(np.uint8)
    qs = q[:, :16] | (q[:, 16:] << 4)
    return np.concatenate([d.reshape(-1, 1).view(np.uint8), qs], axis=1).reshape(rows, -1)


def quantize(values: np.ndarray, type_name: str) -> np.ndarray:
    """GGUF bytes of ``values`` in ``type_name``: gguf-py's quantizer, ours for the
    K-quants."""
    import gguf

    if type_name == "Q6_K":
        return quantize_q6_k(values)
    if type_name in ("Q4_K", "Q5_K"):
        return quantize_k_min(values, 4 if type_name == "Q4_K" else 5)
    if type_name == "IQ4_NL":
        return quantize_iq4_nl(values)
    return gguf.quants.quantize(values, gguf.GGMLQuantizationType[type_name])


def _tokenizer_fields(writer, tokenizer_dir: Path) -> None:
    data = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text())
    vocab: Dict[str, int] = data["model"]["vocab"]
    special = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    vocab = {**vocab, **special}
    tokens = [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if tok in special else 1 for tok in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(special["<|im_start|>"])
    writer.add_eos_token_id(special["<|endoftext|>"])
    writer.add_pad_token_id(special["<|endoftext|>"])
    writer.add_add_bos_token(False)


def write_llama_gguf(path: Path, hf_dir: Path, linear_types: Dict[str, str],
                     default_type: str = "Q4_1", embedding_type: str = "Q8_0") -> Path:
    """Write the Llama checkpoint in ``hf_dir`` (with its tokenizer) as a GGUF file.

    ``linear_types`` overrides the GGML type of individual GGUF tensors by name; every
    other linear weight gets ``default_type``; norms stay F32.
    """
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(hf_dir)
    state = {}
    for shard in sorted(Path(hf_dir).glob("*.safetensors")):
        state.update(load_file(shard))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    _tokenizer_fields(writer, hf_dir)
    for hf_name, tensor in state.items():
        base, suffix = hf_name.rsplit(".", 1)
        name = names.get_name(base) + "." + suffix
        values = tensor.to(torch.float32).numpy()
        if name.endswith("attn_q.weight"):
            values = llama_permute(values, config.num_attention_heads, None)
        elif name.endswith("attn_k.weight"):
            values = llama_permute(values, config.num_attention_heads,
                                   config.num_key_value_heads)
        if values.ndim == 1:
            writer.add_tensor(name, values)
            continue
        type_name = embedding_type if name == "token_embd.weight" else (
            linear_types.get(name, default_type))
        qtype = gguf.GGMLQuantizationType[type_name]
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, values)
        else:
            writer.add_tensor(name, quantize(values, type_name), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
