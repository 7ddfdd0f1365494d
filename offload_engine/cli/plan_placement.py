"""`plan`'s placement lines: where each decoder layer part runs, and the predicted step of
streaming beside the hybrid (planning/placement.py decides; this only renders)."""

from __future__ import annotations

from itertools import groupby
from typing import List


def render(plan, size) -> List[str]:
    """Text lines for plan.placement (empty when the plan has none)."""
    info = plan.placement
    if not info:
        return []
    stream, hybrid = info["predicted_stream_step_s"], info["predicted_hybrid_step_s"]
    source = info["cpu_bandwidth_source"] or "not in the profile"
    lines = ["", f"placement (--placement {info['placement']}): {info['placement_chosen']}, "
             f"{info['placement_reason']}",
             f"  CPU int4 kernel: {info['cpu_bandwidth_gb_s']:.1f} GB/s ({source})"]
    lines += [f"  layers {_span(group)}: {words}"
              for words, group in groupby(enumerate(info["layers"]), key=lambda item: item[1])]
    if info["cpu_parts"]:
        lines.append(f"  on the CPU: {info['cpu_parts']} parts, {size(info['cpu_part_bytes'])} "
                     "read from host RAM per step")
    moe = "expert_cpu_bytes_per_step" in info
    if moe:
        pred = plan.prediction
        cold = pred.experts_per_step * (1 - pred.expert_hit_rate)
        lines.append(f"  cold experts: {cold:.0f} of {pred.experts_per_step} per step (hit rate "
                     f"{pred.expert_hit_rate:.1%}): streamed, "
                     f"{size(pred.expert_stream_bytes_per_step)} over the link; or computed on "
                     f"the CPU (--placement experts-cpu), "
                     f"{size(info['expert_cpu_bytes_per_step'])} read from host RAM")
    lines.append("  PREDICTION per decode step: stream "
                 + (f"{stream * 1e3:.2f} ms ({1 / stream:.3g} tok/s)" if stream else "n/a")
                 + (", cold experts on the CPU " if moe else ", hybrid ")
                 + (f"{hybrid * 1e3:.2f} ms ({1 / hybrid:.3g} tok/s)" if hybrid
                    else "not predicted (everything fits, or no CPU figure)"))
    return lines


def _span(group) -> str:
    indices = [index for index, _ in group]
    return str(indices[0]) if len(indices) == 1 else f"{indices[0]}-{indices[-1]}"
