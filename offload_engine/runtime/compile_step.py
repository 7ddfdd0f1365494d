"""How the decode step is compiled under ``--compile``; imported only when it is on.

transformers' ``generate`` drives it: given a compileable (static-shape) KV cache and a
``CompileConfig``, it runs the prefill eagerly and every decode step through
``torch.compile(model.__call__)``, kept on the model between calls. We choose:

- ``fullgraph=True``: the step is one graph. A weight the cache holds resident for its
  whole life is traced as a constant: the graph calls its kernel (the CPU int4 op,
  F.linear, a Triton kernel) directly, with no cache bookkeeping per step; the cache
  counts those uses once per step instead (:func:`count_steps`). Every other linear is
  one opaque custom op (runtime/compiled_linear.py), so nothing in the cache breaks it;
- inductor emulates eager's rounding of bfloat16/float16 intermediates
  (``emulate_precision_casts``), so greedy tokens match the eager step's;
- ``dynamic=False``: shapes are specialised; the KV cache comes in power-of-two buckets
  (runtime/kv_static.py), so the step compiles once per (batch size, bucket);
- ``mode="reduce-overhead"`` (CUDA graphs) on CUDA when every weight is resident, since a
  captured graph replays fixed addresses and a streamed weight's slot changes; otherwise
  the default mode: on CPU, and on CUDA while weights stream, the prefetch waits run
  inside the linear ops as in eager mode.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch

from . import compiled_linear

logger = logging.getLogger(__name__)
REDUCE_OVERHEAD = "reduce-overhead"  # inductor with CUDA graphs
DEFAULT_MODE = "default"


def attach(modules: Iterable, cache) -> None:
    """Route ``modules`` (OffloadedLinear) through the compiled step: a permanently
    resident weight as a traced constant, any other through the custom op."""
    key = compiled_linear.register_cache(cache)
    for module in modules:
        module.cache_key = key
        module.inline_weight = cache.permanent_weight(module.weight_name)
    cache.inlined = frozenset(module.weight_name for module in modules
                              if module.inline_weight is not None)


def detach(modules: Iterable) -> None:
    """Drop the traced constants (views into the arena) when the engine closes."""
    for module in modules:
        if getattr(module, "inline_weight", None) is not None:
            module.inline_weight = None


def count_steps(cache, steps: int) -> None:
    """Count the uses the compiled steps made of inlined weights (they bypass acquire)."""
    cache.count_uses(cache.inlined, steps)


def compile_mode(device: torch.device, streams: bool) -> str:
    """reduce-overhead (CUDA graphs) on CUDA with nothing streamed, else default."""
    return REDUCE_OVERHEAD if device.type == "cuda" and not streams else DEFAULT_MODE


def configure_inductor() -> None:
    """Settings every compiled step here is built with: eager's bf16/fp16 rounding."""
    import torch._inductor.config as inductor_config

    inductor_config.emulate_precision_casts = True


def compile_config(device: torch.device, streams: bool):
    """The transformers CompileConfig ``generate`` compiles the decode step with."""
    from transformers import CompileConfig

    configure_inductor()

    mode = compile_mode(device, streams)
    config = CompileConfig(fullgraph=True, dynamic=False, backend="inductor", mode=mode)
    config._compile_all_devices = True  # generate compiles on CUDA only unless told
    return config


def compile_seconds() -> float:
    """Seconds this process has spent compiling frames so far (dynamo's own timer)."""
    from torch._dynamo.utils import calculate_time_spent

    return float(calculate_time_spent().get("entire_frame_compile", 0.0))


def compilations() -> int:
    """Graphs compiled in this process so far (dynamo's counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
