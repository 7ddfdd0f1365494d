"""The host tier's policy: which weights stay in host RAM and which are read from disk.

The weights the device cache streams are copied host->device in the same cyclic
order every forward pass, so host RAM faces the same problem as the device arena:
a cyclic scan larger than the memory for it. The answer is the same, and comes from
the same function (:func:`plan_cache`, static policy): a fixed set of streamed
weights stays in RAM for the whole run; the rest is read from the shard files every
pass through a small ring of host buffers. Weights resident on the device need no
host copy after loading (they are read from disk once, at load), so only streamed
weights compete for the host budget. The runtime and the planner both call
:func:`plan_host`, so bytes read per token and the plan agree by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from ..errors import ConfigError
from ..units import format_bytes
from .policy import plan_cache

# One buffer being copied host->device, two being read ahead: the reader has one read
# in flight and one finished read of slack for the jitter of disk latencies.
DISK_RING_SLOTS = 3


@dataclass
class HostPlan:
    """How the host budget is split between weights kept in RAM and a disk ring."""

    budget_bytes: Optional[int]  # None: unbounded, every weight in RAM (no disk tier)
    in_ram: List[str] = field(default_factory=list)  # kept in host RAM, execution order
    on_disk: List[str] = field(default_factory=list)  # read from the shards every pass
    ring_slots: int = 0  # host buffers the disk reader fills ahead of the copies
    ring_slot_bytes: int = 0  # each holds the largest weight read from disk
    ram_bytes: int = 0  # weights kept in host RAM
    disk_bytes_per_pass: int = 0  # read from disk per forward pass (= per decoded token)
    minimum_budget: int = 0  # the ring plus any weight larger than a ring slot

    @property
    def ring_bytes(self) -> int:
        return self.ring_slots * self.ring_slot_bytes

    @property
    def held_bytes(self) -> int:
        """Host RAM the weights take: what the budget bounds."""
        return self.ram_bytes + self.ring_bytes

    @property
    def bounded(self) -> bool:
        return self.budget_bytes is not None


def plan_host(entries: Sequence[Tuple[str, int]], device_resident: Sequence[str],
              budget_bytes: Optional[int], ring_slots: int = DISK_RING_SLOTS) -> HostPlan:
    """Plan host RAM for ``entries`` = [(name, bytes as stored)] in execution order.

    ``device_resident`` are the weights the device cache keeps for the whole run.
    ``budget_bytes`` None keeps every weight in RAM, as without a disk tier.
    """
    if budget_bytes is None:
        return HostPlan(None, in_ram=[name for name, _ in entries],
                        ram_bytes=sum(nbytes for _, nbytes in entries))
    if budget_bytes < 0:
        raise ConfigError(f"--host-budget must be 0 or more, got {budget_bytes}")
    resident = set(device_resident)
    streamed = [(name, nbytes, nbytes) for name, nbytes in entries if name not in resident]
    # The ring is use-once, like the device cache's staging ring: its depth is the number
    # of read-ahead buffers beyond the one being copied.
    split = plan_cache(streamed, None, "static", ring_slots - 1)
    if budget_bytes < split.minimum_budget:
        raise ConfigError(
            f"host budget {format_bytes(budget_bytes)} is below the minimum of "
            f"{format_bytes(split.minimum_budget)} ({ring_slots} disk ring buffers of the "
            "largest streamed weight, plus any weight larger than a buffer kept in RAM); "
            "raise --host-budget, or give the device more room (--gpu-budget) so fewer "
            "weights stream"
        )
    split = plan_cache(streamed, budget_bytes, "static", ring_slots - 1)
    kept = set(split.resident)
    sizes = dict(entries)
    on_disk = [name for name, _, _ in streamed if name not in kept]
    return HostPlan(
        budget_bytes, in_ram=[name for name, _, _ in streamed if name in kept],
        on_disk=on_disk, ring_slots=split.slot_count, ring_slot_bytes=split.slot_bytes,
        ram_bytes=split.resident_bytes, disk_bytes_per_pass=sum(sizes[n] for n in on_disk),
        minimum_budget=split.minimum_budget,
    )


def host_summary(plan: Optional[HostPlan]) -> dict:
    """The host plan as the flat numbers the stats and the plan report."""
    if plan is None or not plan.bounded:
        return {"host_budget_bytes": None, "disk_bytes_per_pass": 0}
    return {"host_budget_bytes": plan.budget_bytes, "host_ram_bytes": plan.ram_bytes,
            "host_ring_bytes": plan.ring_bytes, "disk_weights": len(plan.on_disk),
            "disk_bytes_per_pass": plan.disk_bytes_per_pass}
