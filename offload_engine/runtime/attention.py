"""Which attention implementation a model runs with (``--attention``)."""

from __future__ import annotations

import importlib.util

import torch

from ..errors import ConfigError
from ..model import architecture
from .config import EngineConfig


def attention_for(config: EngineConfig, hf_config=None) -> str:
    """--attention, or for auto the best one transformers supports for this model."""
    supported = (architecture.supported_attention(hf_config) if hf_config is not None
                 else ("flash_attention_2", "sdpa", "eager"))
    if config.attention == "flash_attention_2":
        check_flash_attention(config.torch_device())
    if config.attention != "auto":
        if config.attention not in supported:
            raise ConfigError(f"--attention {config.attention} is not supported by transformers "
                              f"for {getattr(hf_config, 'model_type', 'this model')}; use "
                              f"{' or '.join(supported)} (or auto)")
        return config.attention
    if ("flash_attention_2" in supported and config.torch_device().type == "cuda"
            and importlib.util.find_spec("flash_attn")):
        return "flash_attention_2"
    return "sdpa" if "sdpa" in supported else "eager"


def check_flash_attention(device: torch.device) -> None:
    """--attention flash_attention_2 needs the flash-attn package and a CUDA device."""
    if device.type != "cuda":
        raise ConfigError(f"--attention flash_attention_2 runs on CUDA only, not {device}; "
                          "use --attention sdpa (or auto)")
    if importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("--attention flash_attention_2 needs the flash-attn package: "
                          "pip install 'offload-engine[flash]', or use --attention sdpa")
