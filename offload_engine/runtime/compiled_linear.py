"""The cache-backed linear as one opaque torch op, for ``torch.compile`` (``--compile``).

``torch.compile`` must not trace the device cache: acquire/release take a lock, wait on
the prefetch worker, count hits and bytes in Python integers, and pick a kernel from the
input's device and dtype. Traced, each counter would become a guard that fails on the
next step (a recompilation per token), and the waits would break the graph. So the whole
of one linear (acquire the weight, run the gateway's ``quantized_linear`` or, for the
dequantized cache format, ``F.linear``, release) is registered as the custom op
``offload_engine::cached_linear`` with a fake implementation that only states the output
shape; dynamo sees one node per linear and the cache keeps working as in eager mode.

The same op covers streamed weights: their prefetch wait happens inside it, so the graph
is neither split nor changed when a budget streams (docs/performance.md says why). The
op is registered when this module is imported, which the engine does only for
``--compile``; nothing compiles at import.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch

from .linear import apply_weight
from .ranges import LINEAR, profiled

OP_NAME = "offload_engine::cached_linear"
_caches: weakref.WeakValueDictionary[int, object] = weakref.WeakValueDictionary()


def register_cache(cache) -> int:
    """The key under which the op finds ``cache`` (an int: dynamo keeps it as a constant)."""
    key = id(cache)
    _caches[key] = cache
    return key


@torch.library.custom_op(OP_NAME, mutates_args=())
def cached_linear(x: torch.Tensor, bias: Optional[torch.Tensor], cache_key: int, name: str,
                  out_features: int) -> torch.Tensor:
    """y = x @ W.T + bias with W = weight ``name`` of the registered cache ``cache_key``."""
    cache = _caches.get(cache_key)
    if cache is None:
        raise RuntimeError(f"{name}: its weight cache was closed; load the model again")
    with profiled(LINEAR):
        handle = cache.acquire(name)
        try:
            return apply_weight(x, handle.weight, bias)
        finally:
            cache.release(handle)


@cached_linear.register_fake
def _(x: torch.Tensor, bias: Optional[torch.Tensor], cache_key: int, name: str,
      out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))  # (..., out_features)
