"""How the decode step is compiled under ``--compile``; imported only when it is on.

transformers' ``generate`` drives it: given a compileable (static-shape) KV cache and a
``CompileConfig``, it runs the prefill eagerly and every decode step through
``torch.compile(model.__call__)``, kept on the model between calls. We choose:

- ``fullgraph=True``: the step is one graph; each linear is one opaque custom op
  (runtime/compiled_linear.py), so nothing in the cache breaks it;
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
    """Route ``modules`` (OffloadedLinear) through the custom op when compiled."""
    key = compiled_linear.register_cache(cache)
    for module in modules:
        module.cache_key = key


def compile_mode(device: torch.device, streams: bool) -> str:
    """reduce-overhead (CUDA graphs) on CUDA with nothing streamed, else default."""
    return REDUCE_OVERHEAD if device.type == "cuda" and not streams else DEFAULT_MODE


def compile_config(device: torch.device, streams: bool):
    """The transformers CompileConfig ``generate`` compiles the decode step with."""
    from transformers import CompileConfig

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
