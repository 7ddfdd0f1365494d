"""Where a plan's layer parts run: the planner's numbers handed to the placement choice
(placement.place_parts for dense layers, moe_placement.place_experts for experts)."""

from __future__ import annotations

from typing import Dict, List, Optional

from ..model.model_shape import ModelShape
from .moe_placement import PLACE_PARTS, place_experts
from .overhead import weight_read_bandwidth
from .placement import Placement, place_parts, split_parts


def add_placement(plan, entries, shape: ModelShape, request,
                   budget: Optional[int]) -> None:
    """Decide where layer parts run (placement.place_parts) from this plan's numbers: the
    device room for layer parts is the arena budget less the weights outside the layers."""
    parts = split_parts([(name, copy) for name, _, copy in entries])
    in_parts = {name for part in parts for name in part.names}
    outside = sum(held for name, held, _ in entries if name not in in_parts)
    room = None if budget is None else max(budget - outside, 0)
    profile, prediction = request.profile, plan.prediction
    if shape.experts is not None or request.placement not in PLACE_PARTS:
        placement = place_experts(shape, plan, request, parts)  # MoE: where cold experts run
    elif profile.device == "cpu" and request.placement == "auto":  # as the runtime decides
        placement = Placement("auto", "stream", [], parts, prediction.step_s,
                              reason="the device is the CPU")
    else:
        placement = place_parts(
            parts, request.placement, room,
            {"device": weight_read_bandwidth(profile), "h2d": profile.h2d_bandwidth,
             "cpu": profile.cpu_bandwidth},
            request.batch, prediction.step_s, prediction.resident_read_s + prediction.stream_s)
    plan.placement_plan = placement
    plan.placement = {**placement.summary(),
                      "cpu_bandwidth_gb_s": profile.cpu_bandwidth / 1e9,
                      "cpu_bandwidth_source": profile.cpu_bandwidth_source,
                      "layers": placement_by_layer(parts, placement)}


def placement_by_layer(parts, placement: Placement) -> List[str]:
    """One word per decoder layer: 'attention:device mlp:cpu'."""
    layers: Dict[int, List[str]] = {}
    for part in parts:
        layers.setdefault(part.layer, []).append(f"{part.kind}:{placement.where(part)}")
    return [" ".join(words) for _, words in sorted(layers.items())]
