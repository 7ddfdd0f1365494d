"""The cache-backed replacement for nn.Linear."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import quantized_linear
from .ranges import LINEAR, profiled


class OffloadedLinear(nn.Module):
    """A linear layer whose weight lives in the device cache, fetched on each forward.

    It owns no weight parameter (so nothing full-precision is ever materialised);
    the bias, if any, is a small dense parameter loaded with the model.
    """

    def __init__(self, weight_name: str, in_features: int, out_features: int, has_bias: bool):
        super().__init__()
        self.weight_name = weight_name
        self.in_features = in_features
        self.out_features = out_features
        self.bias = (nn.Parameter(torch.empty(out_features, device="meta"), requires_grad=False)
                     if has_bias else None)
        self.cache = None  # set by attach(); a DeviceCache
        self.cache_key: Optional[int] = None  # set for --compile (runtime/compiled_linear.py)
        # --compile, a weight resident for the cache's whole life: traced as a constant, so
        # the compiled step calls its kernel directly (runtime/compile_step.py)
        self.inline_weight = None

    def attach(self, cache) -> None:
        self.cache = cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            raise RuntimeError(f"{self.weight_name}: no cache attached (use offload_engine.load)")
        if self.cache_key is not None and torch.compiler.is_compiling():
            if self.inline_weight is not None:
                return apply_weight(x, self.inline_weight, self.bias)
            # one opaque node for torch.compile: the cache is never traced
            return torch.ops.offload_engine.cached_linear(x, self.bias, self.cache_key,
                                                          self.weight_name, self.out_features)
        with profiled(LINEAR):
            handle = self.cache.acquire(self.weight_name)
            try:
                return apply_weight(x, handle.weight, self.bias)
            finally:
                self.cache.release(handle)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight={self.weight_name!r}")


def apply_weight(x: torch.Tensor, weight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x @ weight.T + bias, for a weight held dequantized or packed (via the kernel gateway)."""
    if isinstance(weight, torch.Tensor):  # held dequantized in the compute dtype
        return F.linear(x, weight, bias)
    return quantized_linear(x, weight, bias)
