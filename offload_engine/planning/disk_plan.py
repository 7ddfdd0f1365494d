"""The disk tier in the plan: host RAM split, bytes read from disk per token, disk time.

:func:`add_disk_tier` completes a :class:`~offload_engine.planning.planner.Plan`: it
asks the host policy (:func:`plan_host`, the one the runtime uses) which streamed
weights stay in host RAM under ``--host-budget``, and adds the disk read to the
PREDICTION. The disk reader runs ahead of the host->device copies into its own ring
of buffers, so the two transfers overlap: the slower one bounds the step, and the
step's transfer term becomes ``max(stream, disk read)``. The disk speed comes from the
profile's optional ``disk_read_gb_s`` (what `calibrate` measures); without it the
disk time is left out of the prediction and the plan says so.
"""

from __future__ import annotations

from dataclasses import replace
from typing import List, Optional, Sequence, Tuple

from ..errors import ConfigError
from ..units import parse_bytes
from .host_policy import HostPlan, plan_host
from .settings import UNBOUNDED


def host_budget_bytes(value) -> Optional[int]:
    """``--host-budget`` in bytes; None (also for 'unbounded') keeps every weight in RAM."""
    if value is None or str(value).strip().lower() in UNBOUNDED:
        return None
    try:
        return parse_bytes(value)
    except Exception as exc:  # argparse.ArgumentTypeError: not a ValueError
        raise ConfigError(f"--host-budget: {exc}") from exc


def add_disk_tier(plan, entries: Sequence[Tuple[str, int, int]], host_budget,
                  disk_read_bandwidth: Optional[float]):
    """``plan`` with ``plan.host`` filled and the disk read in its prediction."""
    host = plan_host([(name, nbytes) for name, _, nbytes in entries], plan.cache.resident,
                     host_budget_bytes(host_budget))
    disk_bytes = host.disk_bytes_per_pass
    prediction = plan.prediction
    notes: List[str] = []
    disk_s = 0.0
    if disk_bytes and disk_read_bandwidth:
        disk_s = disk_bytes / disk_read_bandwidth
    elif disk_bytes:
        notes.append("disk time not predicted: the profile has no disk_read_gb_s (add it, or "
                     "measure it with `offload-engine calibrate`); the speed is an upper bound")
    step = prediction.step_s - prediction.stream_s + max(prediction.stream_s, disk_s)
    batch = plan.settings["batch"]
    plan.prediction = replace(
        prediction, disk_read_s=disk_s, disk_bytes_per_step=disk_bytes, step_s=step,
        tokens_per_s=batch / step if step else float("inf"),
        tokens_per_s_per_sequence=1 / step if step else float("inf"))
    plan.host = host_facts(host, disk_read_bandwidth, notes)
    if host.bounded and plan.hardware["device"] == "cpu":  # the host store shares the RAM
        plan.memory.host_store = host.held_bytes
        plan.fits = plan.memory.total <= plan.hardware["memory_bytes"]
    return plan


def host_facts(host: HostPlan, disk_read_bandwidth: Optional[float], notes: List[str]) -> dict:
    return {
        "budget_bytes": host.budget_bytes, "ram_bytes": host.ram_bytes,
        "ring_bytes": host.ring_bytes, "ring_slots": host.ring_slots,
        "minimum_budget": host.minimum_budget, "weights_in_ram": len(host.in_ram),
        "weights_on_disk": len(host.on_disk), "disk_bytes_per_step": host.disk_bytes_per_pass,
        "disk_read_bandwidth": disk_read_bandwidth, "notes": notes,
    }
