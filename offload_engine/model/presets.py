"""Published shapes of well-known models, so `synth` and `plan` need no download.

Each entry is the part of the model's config.json that decides shapes and the decode
path, copied from its Hugging Face page. Weights are never implied: `synth` fills
them with seeded random numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

from ..errors import ConfigError


def _qwen2(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> dict:
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "vocab_size": 152064,
            "tie_word_embeddings": False, "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu"}


def _llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
           vocab: int, tied: bool = False, positions: int = 8192,
           rope_theta: float = 500000.0) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "vocab_size": vocab,
            "tie_word_embeddings": tied, "max_position_embeddings": positions,
            "rms_norm_eps": 1e-5, "rope_theta": rope_theta, "hidden_act": "silu"}


PRESETS: Dict[str, dict] = {
    # Qwen2.5-32B(-Instruct) and DeepSeek-R1-Distill-Qwen-32B share these shapes.
    "qwen2.5-32b": _qwen2(5120, 27648, 64, 40, 8),
    "qwen2.5-72b": _qwen2(8192, 29568, 80, 64, 8),
    "qwen2.5-14b": _qwen2(5120, 13824, 48, 40, 8),
    "qwen2.5-7b": _qwen2(3584, 18944, 28, 28, 4),
    "llama-3-8b": _llama(4096, 14336, 32, 32, 8, 128256),
    "llama-3-70b": _llama(8192, 28672, 80, 64, 8, 128256),
    "smollm2-135m": _llama(576, 1536, 30, 9, 3, 49152, tied=True, positions=8192,
                           rope_theta=100000.0),
}


def preset_config(name: str) -> dict:
    """A copy of a preset's config dictionary, or a ConfigError naming the presets."""
    key = name.strip().lower()
    if key not in PRESETS:
        raise ConfigError(f"{name!r} is neither a config.json nor a built-in model; "
                          f"built-in: {', '.join(sorted(PRESETS))}")
    return dict(PRESETS[key])


def is_preset(name: str) -> bool:
    """True for a built-in name that is not also a path on disk."""
    return name.strip().lower() in PRESETS and not Path(name).expanduser().exists()
