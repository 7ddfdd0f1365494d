"""The planner's per-token overhead term, and which of its figures were measured.

Bytes alone predict 53 tok/s for a 32B model on an RTX 3090, but eager decode issues
~3,500 ops per token and each costs microseconds of dispatch and launch on a GPU: a
floor of tens of milliseconds that no bandwidth buys back. The term is

    overhead per step = ops per decode step (counted on a tiny model of the same
                        architecture and depth, model/op_count.py)
                      x seconds per op (the hardware profile: measured by
                        `offload-engine calibrate`, or an estimate with its source)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional

from ..model.model_shape import ModelShape
from .profiles import HardwareProfile

logger = logging.getLogger(__name__)
# Profile figures the prediction uses, by TOML key, with what they decide.
FIGURES = {
    "device_bandwidth_gb_s": "resident weight reads",
    "h2d_bandwidth_gb_s": "streamed weight copies",
    "op_overhead_us": "per-op overhead",
    "kernel_bandwidth_gb_s": "fused kernel reads",
    "disk_read_gb_s": "disk reads (--host-budget)",
}


@dataclass(frozen=True)
class Overhead:
    """One decode step's op overhead (part of a PREDICTION)."""

    ops_per_step: Optional[int]  # None: the architecture could not be counted
    seconds_per_op: float  # from the profile
    seconds: float  # ops x seconds per op; 0 when either is unknown


def attach_decode_ops(shape: ModelShape, hf_config) -> ModelShape:
    """Count the ops of one decode step for ``shape`` (once per architecture and depth)."""
    from ..model.op_count import decode_ops

    try:
        ops = decode_ops(hf_config)
    except Exception as exc:  # an architecture transformers cannot build tiny: no term
        logger.warning("could not count the decode ops of %s (%s); the prediction leaves "
                       "out the per-op overhead", shape.source, exc)
        return shape
    shape.decode_ops_per_step = ops.at_depth(shape.num_layers)
    return shape


def decode_overhead(shape: ModelShape, profile: HardwareProfile) -> Overhead:
    ops = shape.decode_ops_per_step
    seconds = ops * profile.op_overhead_s if ops is not None else 0.0
    return Overhead(ops, profile.op_overhead_s, seconds)


def weight_read_bandwidth(profile: HardwareProfile) -> float:
    """Bytes/s for reading resident weights: the kernel's measured rate when calibrated."""
    if profile.kernel_bandwidth > 0:
        return min(profile.kernel_bandwidth, profile.device_bandwidth)
    return profile.device_bandwidth


def figure_sources(profile: HardwareProfile) -> Dict[str, List[str]]:
    """{"measured": [...], "estimated": [...]}: which profile figures a prediction rests on."""
    measured, estimated = [], []
    for key, label in FIGURES.items():
        if key == "kernel_bandwidth_gb_s" and profile.kernel_bandwidth == 0:
            continue
        if key == "disk_read_gb_s" and profile.disk_read_bandwidth is None:
            continue
        if key in profile.measured:
            measured.append(f"{label} ({key})")
        elif key == "op_overhead_us" and profile.op_overhead_s == 0:
            estimated.append(f"{label}: NOT COUNTED (the profile has no op_overhead_us)")
        else:
            note = f": {profile.op_overhead_source}" if key == "op_overhead_us" else ""
            estimated.append(f"{label} ({key}){note}")
    return {"measured": measured, "estimated": estimated}
