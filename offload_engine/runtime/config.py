"""Engine settings: one dataclass, validated on construction, resolved against a device."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, replace
from typing import Optional, Union

import psutil
import torch

from ..errors import ConfigError
from ..planning.kv_sizes import check_kv_mode
from ..planning.placement import check_placement
from ..planning.policy import POLICIES
from ..planning.settings import DTYPES, EMBEDDING_PLACES, UNBOUNDED
from ..planning.sizes import CACHE_FORMATS, auto_cache_format, auto_dtype
from ..planning.speculation import check_speculation
from ..planning.words import EXPERT_POLICIES, ON_OFF
from ..units import parse_budget, parse_bytes


@dataclass
class EngineConfig:
    """How to run a quantized model. Every field has a CLI flag of the same name."""

    device: str = "auto"  # "auto" (cuda:0 if present, else cpu), "cuda:1", "cpu"
    gpu_budget: Optional[Union[str, int, float]] = None  # "10GiB", bytes, 0.8 = share of free
    cache_entries: Optional[int] = None  # classic N-entry cache; excludes gpu_budget
    policy: str = "static"  # "static" (resident set + ring) or "lru" (classic)
    prefetch_depth: int = 2  # streamed weights copied ahead of the one computing
    expert_policy: str = "lfu"  # MoE expert cache: "lfu" (most used stay) or "lru"
    expert_prefetch: str = "on"  # MoE: copy the next layer's guessed experts while a layer
    # computes ("on"), or fetch routed experts on demand only ("off")
    cache_format: str = "auto"  # "packed", "dequantized", "prepacked" (CPU); auto: packed on
    # CUDA; on CPU prepacked for bfloat16 and the int4 schemes (CPU int4 kernel), else dequantized
    dtype: str = "auto"  # compute dtype; auto: bfloat16 on CUDA and, on CPU, for the schemes
    # the CPU int4 kernel runs (int4, int4-asym, int4-min), else float32 (sizes.auto_dtype)
    attention: str = "auto"  # "flash_attention_2", "sdpa", "eager"; auto picks
    hw_profile: Optional[str] = None  # preset name or TOML path: budget as `plan` derives it
    embeddings: str = "device"  # "host" keeps the token embedding table off the device
    progress: bool = True  # tqdm bars while loading
    host_budget: Optional[Union[str, int]] = None  # host RAM for weights; None: what fits
    # in available RAM with a margin; "unbounded": every weight in RAM. The rest is read
    # from the shard files every pass (planning/host_policy.py decides which).
    speculate: str = "off"  # "lookup" (n-gram prompt lookup) or "draft" (--draft-model)
    speculate_tokens: int = 4  # K: proposals the target verifies per forward pass
    lookup_ngram: int = 2  # longest n-gram --speculate lookup matches in the context
    draft_model: Optional[str] = None  # quantized directory of the draft, kept resident
    kv_cache: str = "bf16"  # bf16 (the compute dtype, unquantized), int8, int4
    kv_budget: Optional[Union[str, int]] = None  # device bytes for the KV cache; None: no cap
    compile: bool = False  # decode steps through torch.compile with a static-shape KV cache
    placement: str = "auto"  # where layer parts run: auto, stream, cpu, mlp-cpu
    # (planning/placement.py); auto: the planner's choice for --hw-profile, else stream

    def __post_init__(self) -> None:
        if self.gpu_budget is not None and self.cache_entries is not None:
            raise ConfigError("give either --gpu-budget or --cache-entries, not both")
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown --policy {self.policy!r}: use {' or '.join(POLICIES)}")
        if self.expert_policy not in EXPERT_POLICIES:
            raise ConfigError(f"unknown --expert-policy {self.expert_policy!r}: use "
                              f"{' or '.join(EXPERT_POLICIES)}")
        if self.expert_prefetch not in ON_OFF:
            raise ConfigError(f"--expert-prefetch must be on or off, got {self.expert_prefetch!r}")
        if self.prefetch_depth < 0:
            raise ConfigError(f"--prefetch-depth must be 0 or more, got {self.prefetch_depth}")
        if self.cache_entries is not None and self.cache_entries < 1:
            raise ConfigError(f"--cache-entries must be at least 1, got {self.cache_entries}")
        if self.cache_format not in CACHE_FORMATS + ("auto",):
            raise ConfigError(f"unknown --cache-format {self.cache_format!r}: use auto, "
                              f"{', '.join(CACHE_FORMATS)}")
        if self.dtype not in tuple(DTYPES) + ("auto",):
            raise ConfigError(f"unknown --dtype {self.dtype!r}: use auto, {', '.join(DTYPES)}")
        if self.embeddings not in EMBEDDING_PLACES:
            raise ConfigError(f"unknown --embeddings {self.embeddings!r}: use device or host")
        if self.gpu_budget is not None:
            _budget_kind(self.gpu_budget)  # fail early on unreadable text
        if self.host_budget is not None:
            self.host_bytes(lambda: 0)  # fail early on unreadable text
        check_kv_mode(self.kv_cache)
        check_placement(self.placement)
        self.kv_budget_bytes()  # fail early on unreadable text
        if self.cache_format == "prepacked" and resolve_device(self.device).type != "cpu":
            raise ConfigError("--cache-format prepacked is the CPU int4 kernel's form: use it "
                              "with --device cpu, or packed on CUDA")
        resolve_device(self.device)
        check_speculation(self.speculate, self.speculate_tokens, self.lookup_ngram,
                          self.draft_model)
        if not isinstance(self.compile, bool):
            raise ConfigError(f"compile must be True or False, got {self.compile!r}")
        if self.compile and self.speculate != "off":
            raise ConfigError(f"--compile does not combine with --speculate {self.speculate} "
                              "(its verify passes change shape every step): drop one of them")

    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    def torch_dtype(self, spec=None) -> torch.dtype:
        """The compute dtype; for auto, the one that suits the device and the checkpoint's
        QuantSpec ``spec`` (None: unknown, CPU gets float32)."""
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        return auto_dtype(self.torch_device().type, spec)

    def resolved(self, spec) -> EngineConfig:
        """This config with ``dtype`` auto made concrete for a checkpoint of ``spec``."""
        if self.dtype != "auto":
            return self
        return replace(self, dtype=str(self.torch_dtype(spec)).replace("torch.", ""))

    def resolved_cache_format(self, spec=None) -> str:
        """The --cache-format; for auto, the one that suits the device, dtype and the
        checkpoint's QuantSpec ``spec`` (None: unknown, CPU gets dequantized)."""
        if self.cache_format != "auto":
            return self.cache_format
        return auto_cache_format(self.torch_device().type, self.torch_dtype(spec), spec)

    def budget_bytes(self) -> Optional[int]:
        """The arena budget in bytes; None when unbounded."""
        if self.gpu_budget is None:
            return None
        kind, value = _budget_kind(self.gpu_budget)
        if kind == "unbounded":
            return None
        if kind == "bytes":
            return int(value)
        return int(value * free_device_bytes(self.torch_device()))

    def host_bytes(self, default):
        """The host budget in bytes, None when unbounded; ``default()`` when not given."""
        value = self.host_budget
        if value is None:
            return default()
        if str(value).strip().lower() in UNBOUNDED:
            return None
        try:
            return parse_bytes(value)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise ConfigError(f"--host-budget: {exc}") from exc

    def kv_budget_bytes(self) -> Optional[int]:
        """The KV cache budget in bytes (--kv-budget); None when not capped."""
        if self.kv_budget is None or str(self.kv_budget).strip().lower() in UNBOUNDED:
            return None
        try:
            return parse_bytes(self.kv_budget)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            raise ConfigError(f"--kv-budget: {exc}") from exc


def _budget_kind(budget):
    if isinstance(budget, bool):
        raise ConfigError(f"--gpu-budget {budget!r} is not a size")
    if isinstance(budget, int):
        return "bytes", budget
    if isinstance(budget, float) or re.fullmatch(r"\s*0?\.\d+\s*|\s*1(\.0*)?\s*", str(budget)):
        fraction = float(budget)
        if not 0 < fraction <= 1:
            raise ConfigError(f"--gpu-budget fraction must be in (0, 1], got {budget}")
        return "fraction", fraction
    if str(budget).strip().lower() in UNBOUNDED:
        return "unbounded", None
    try:
        return "bytes", parse_budget(budget)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        raise ConfigError(f"--gpu-budget: {exc}") from exc


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"--device {name!r} is not a device: use cpu or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: this torch has no CUDA support or no GPU is "
                              "visible; use --device cpu or install a CUDA build of torch")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) found")
    elif device.type != "cpu":
        raise ConfigError(f"--device {name}: only cpu and cuda devices are supported")
    return device


def free_device_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available)
