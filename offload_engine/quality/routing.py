"""Record which experts a mixture-of-experts model's routers pick, token by token.

The trace feeds :func:`offload_engine.planning.expert_policy.replay`, which measures an
expert cache policy's hit rate on it: ``trace[token][layer]`` is the list of experts
that layer's router chose for that token (decode fetches them once per token).
"""

from __future__ import annotations

from typing import List

import torch

from ..runtime.experts import OffloadedExperts


def record_routing(model, input_ids: torch.Tensor) -> List[List[List[int]]]:
    """Run one forward over ``input_ids`` (1, T) and return trace[token][layer] = experts."""
    per_layer: List[torch.Tensor] = []

    def hook(module, args):
        per_layer.append(args[1].detach().cpu())  # top_k_index (T, k)

    modules = [m for m in model.modules() if isinstance(m, OffloadedExperts)]
    if not modules:
        raise ValueError("this model has no offloaded experts layers: load a "
                         "mixture-of-experts model with offload_engine.load")
    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    tokens = input_ids.shape[1]
    return [[layer[t].tolist() for layer in per_layer] for t in range(tokens)]
