"""Sizes and traffic of a mixture-of-experts model's experts, for the planner.

Each expert's matrices are quantized like linears (0.515625 bytes per parameter at int4
g128 with bf16 scales); an expert slot in the arena holds one expert's matrices. Per
decoded token every experts layer uses ``experts_per_token`` experts: those on the
device are read from device memory, the others are copied over the host link. So

    expert bytes per token = layers x top-k x (1 - hit rate) x bytes of one expert

The hit rate is the user's ``--expert-hit-rate`` (measured by `run`/`bench`, or by
tools/expert_trace.py on a routing trace), else the uniform-routing ESTIMATE
slots per layer / experts per layer: a router spreading tokens evenly finds that share
of its picks resident. Trained routers are skewed, which the lfu policy turns into a
higher rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from ..errors import ConfigError
from ..model.model_shape import ModelShape
from ..quant.quantize import QuantizedWeight
from .expert_policy import ExpertPlan, expert_slot_bytes
from .sizes import held_nbytes


@dataclass(frozen=True)
class ExpertSizes:
    """One model's experts, in bytes."""

    layers: List[str]
    num_experts: int
    experts_per_token: int
    held_bytes: int  # one expert in the arena (its matrices, each view aligned)
    copy_bytes: int  # one expert copied host->device (packed)

    @property
    def count(self) -> int:
        return len(self.layers) * self.num_experts

    @property
    def total_copy(self) -> int:
        return self.count * self.copy_bytes

    @property
    def total_held(self) -> int:
        return self.count * self.held_bytes

    @property
    def floor(self) -> int:
        """One slot per layer: the experts' share of the minimum budget."""
        return len(self.layers) * self.held_bytes


def meta_weight(spec, out_features: int, in_features: int) -> QuantizedWeight:
    """A QuantizedWeight of meta tensors: the right shapes and dtypes, no memory."""
    parts = {name: torch.empty(shape, dtype=dtype, device="meta")
             for name, (shape, dtype) in spec.component_shapes(out_features,
                                                               in_features).items()}
    return QuantizedWeight.from_parts(parts, spec, out_features, in_features)


def expert_sizes(shape: ModelShape, cache_format: str,
                 dtype: torch.dtype) -> Optional[ExpertSizes]:
    experts = shape.experts
    if experts is None:
        return None
    held = expert_slot_bytes([held_nbytes(meta_weight(shape.spec, out, inp), cache_format,
                                          dtype) for out, inp in experts.matrices])
    copied = sum(shape.spec.nbytes(out, inp) for out, inp in experts.matrices)
    return ExpertSizes(list(experts.layers), experts.num_experts, experts.experts_per_token,
                       held, copied)


def expert_hit_rate(plan: ExpertPlan, given: Optional[float]) -> float:
    """The hit rate to predict with: the given one, else slots / experts (uniform routing)."""
    if given is not None:
        if not 0.0 <= given <= 1.0:
            raise ConfigError(f"--expert-hit-rate must be between 0 and 1, got {given}")
        return given
    return plan.slots_per_layer / plan.num_experts if plan.num_experts else 1.0


def expert_traffic(sizes: ExpertSizes, hit_rate: float, batch: int = 1) -> dict:
    """Per decode step: experts used, bytes copied host->device, bytes read on the device.

    A batch's tokens mostly pick different experts; the step is counted as if they did
    not share any (an upper bound for batch > 1)."""
    used = len(sizes.layers) * min(sizes.experts_per_token * batch, sizes.num_experts)
    return {"experts_per_step": used,
            "expert_stream_bytes": int(round(used * (1 - hit_rate) * sizes.copy_bytes)),
            "expert_read_bytes": used * sizes.held_bytes}
