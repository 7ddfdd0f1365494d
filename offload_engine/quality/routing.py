"""Record which experts a mixture-of-experts model's routers pick, token by token.

The trace feeds :func:`offload_engine.planning.expert_policy.replay`, which measures an
expert cache policy's hit rate on it: ``trace[token][layer]`` is the list of experts
that layer's router chose for that token (decode fetches them once per token).
"""

from __future__ import annotations

from typing import List, Tuple

import torch

from ..runtime.experts import OffloadedExperts, find_router, guess_experts


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


def guess_accuracy(model, input_ids: torch.Tensor) -> Tuple[int, int]:
    """(guessed experts then used, guessed experts) of the next-layer prefetch over one
    forward of ``input_ids`` (1, T), scored token by token as decode would: for each token
    and each experts layer but the last, the next layer's router applied to this layer's
    input (:func:`offload_engine.runtime.experts.guess_experts`, the runtime's guess)
    against the experts that next layer's router then picked for the token."""
    inputs: List[Tuple[torch.Tensor, torch.Tensor]] = []

    def hook(module, args):
        inputs.append((args[0].detach(), args[1].detach()))  # (T, hidden), (T, k)

    modules = [m for m in model.modules() if isinstance(m, OffloadedExperts)]
    routers = [find_router(model, m) for m in modules[1:]]
    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    used = guessed = 0
    for layer, router in enumerate(routers):
        if router is None:
            continue
        hidden, _ = inputs[layer]
        _, picked = inputs[layer + 1]
        for token in range(hidden.shape[0]):
            guess = guess_experts(router, hidden[token:token + 1], picked.shape[-1])
            guessed += len(guess)
            used += len(set(guess) & set(picked[token].tolist()))
    return used, guessed
