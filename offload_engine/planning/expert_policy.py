"""The expert cache policy as pure functions: how many experts each layer keeps, and which goes.

A mixture-of-experts layer's router picks a few experts per token, so expert weights are
not read in the cyclic order that the ``static`` weight policy relies on. Each layer
gets the same number of expert slots (``slots_per_layer``, at least one); a missing
expert is copied into one of its layer's slots, evicting the one the policy names:

- ``lfu``: the expert used least often so far (ties: the least recently used). Routers
  favour some experts steadily, so counting uses keeps those hot experts resident.
- ``lru``: the least recently used expert, for comparison.

A guessed expert copied ahead by the next-layer prefetch evicts only an expert used no
more often than itself (:func:`choose_prefetch_victim`).

The runtime cache (:mod:`offload_engine.runtime.cache.expert_cache`) and
:func:`replay` (which measures a policy on a recorded routing trace) call the same
:func:`choose_expert_victim`, so measured and replayed hit rates agree by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import ConfigError
from ..units import format_bytes
from .policy import CachePlan, plan_cache
from .sizes import aligned
from .words import EXPERT_POLICIES


@dataclass
class ExpertPlan:
    """How many experts each experts layer keeps on the device."""

    policy: str
    layers: List[str] = field(default_factory=list)  # experts module names, in order
    num_experts: int = 0  # experts per layer
    slots_per_layer: int = 0
    slot_bytes: int = 0  # one expert: all its matrices, as held on the device

    def __post_init__(self):
        if self.policy not in EXPERT_POLICIES:
            raise ConfigError(f"unknown expert policy {self.policy!r}: use one of "
                              f"{', '.join(EXPERT_POLICIES)}")
        if self.layers and not 1 <= self.slots_per_layer <= self.num_experts:
            raise ConfigError(f"expert slots per layer must be 1 to {self.num_experts}, "
                              f"got {self.slots_per_layer}")

    @property
    def arena_bytes(self) -> int:
        return len(self.layers) * self.slots_per_layer * self.slot_bytes

    @property
    def minimum_bytes(self) -> int:
        """One expert slot per layer: a layer computes its experts one after another."""
        return len(self.layers) * self.slot_bytes

    @property
    def all_resident(self) -> bool:
        return self.slots_per_layer == self.num_experts


def expert_slot_bytes(matrix_bytes: Sequence[int]) -> int:
    """Arena bytes of one expert, from its matrices' held bytes (each view aligned)."""
    return sum(aligned(b) for b in matrix_bytes)


def plan_experts(layers: Sequence[str], num_experts: int, slot_bytes: int,
                 room_bytes: Optional[int], policy: str = "lfu") -> ExpertPlan:
    """Give each layer as many expert slots as ``room_bytes`` allows (None: all of them)."""
    if not layers:
        return ExpertPlan(policy)
    if room_bytes is None:
        slots = num_experts
    else:
        per_slot_row = len(layers) * slot_bytes
        slots = min(num_experts, room_bytes // per_slot_row) if per_slot_row else num_experts
        if slots < 1:
            raise ConfigError(
                f"the GPU budget leaves {format_bytes(max(room_bytes, 0))} for experts, below "
                f"the {format_bytes(per_slot_row)} needed for one expert per layer "
                f"({len(layers)} layers x {format_bytes(slot_bytes)}); raise --gpu-budget")
    return ExpertPlan(policy, list(layers), num_experts, slots, slot_bytes)


def choose_expert_victim(policy: str, candidates, uses: Dict[int, int]):
    """The slot to refill among ``candidates`` (slots with ``holder`` and ``last_used``).

    An empty slot is taken first. ``uses`` counts how often each expert of the layer
    was used so far (lfu's criterion).
    """
    empty = [slot for slot in candidates if slot.holder is None]
    if empty:
        return empty[0]
    if not candidates:
        return None
    if policy == "lfu":
        return min(candidates, key=lambda s: (uses.get(s.holder, 0), s.last_used))
    return min(candidates, key=lambda slot: slot.last_used)


def choose_prefetch_victim(policy: str, candidates, uses: Dict[int, int], expert: int):
    """The slot a guessed ``expert`` is prefetched into, or None: the policy's victim
    among the ``candidates`` used no more often than the guess itself. A guess is wrong
    a third of the time or more (docs/moe.md), so it must not push out an expert the
    layer uses more: on the tiny Qwen3-MoE that rule kept prefetch from lowering the
    hit rate (measured in docs/moe.md)."""
    admitted = [s for s in candidates if s.holder is None or uses.get(s.holder, 0)
                <= uses.get(expert, 0)]
    return choose_expert_victim(policy, admitted, uses)


def fetch_order(needed: Sequence[int], on_device) -> List[int]:
    """The order a layer computes its routed experts in: those already on the device first
    (so a fetch cannot evict one about to be used), then the rest, each ascending. The
    results are added up in ascending order whatever this order is."""
    ordered = sorted(set(needed))
    return [e for e in ordered if e in on_device] + [e for e in ordered if e not in on_device]


@dataclass
class _ReplaySlot:
    holder: Optional[int] = None
    last_used: int = 0


def replay(trace: Sequence[Sequence[Sequence[int]]], slots_per_layer: int,
           policy: str) -> Tuple[int, int]:
    """(hits, misses) of ``policy`` on a routing trace: per forward pass, per layer, the
    experts it used (each once per pass, as the runtime fetches them)."""
    if not trace:
        return 0, 0
    layer_count = len(trace[0])
    slots = [[_ReplaySlot() for _ in range(slots_per_layer)] for _ in range(layer_count)]
    uses: List[Dict[int, int]] = [{} for _ in range(layer_count)]
    hits = misses = tick = 0
    for step in trace:
        for layer, experts in enumerate(step):
            on_device = {s.holder for s in slots[layer]}
            for expert in fetch_order(experts, on_device):
                tick += 1
                uses[layer][expert] = uses[layer].get(expert, 0) + 1
                held = [s for s in slots[layer] if s.holder == expert]
                if held:
                    hits += 1
                    held[0].last_used = tick
                    continue
                misses += 1
                victim = choose_expert_victim(policy, slots[layer], uses[layer])
                victim.holder, victim.last_used = expert, tick
    return hits, misses


def static_hits(trace: Sequence[Sequence[Sequence[int]]], resident: Sequence[set]
                ) -> Tuple[int, int]:
    """(uses served by a fixed per-layer ``resident`` set, all uses) on a routing trace:
    what ``--placement experts-cpu`` keeps on the device (the rest runs on the CPU)."""
    hits = uses = 0
    for step in trace:
        for layer, experts in enumerate(step):
            picked = set(experts)
            uses += len(picked)
            hits += len(picked & resident[layer])
    return hits, uses


def most_used(trace: Sequence[Sequence[Sequence[int]]], slots: int) -> List[set]:
    """Per layer, the ``slots`` experts the trace uses most (ties: lower index)."""
    counts: List[Dict[int, int]] = [{} for _ in (trace[0] if trace else [])]
    for step in trace:
        for layer, experts in enumerate(step):
            for expert in set(experts):
                counts[layer][expert] = counts[layer].get(expert, 0) + 1
    return [set(sorted(c, key=lambda e: (-c[e], e))[:slots]) for c in counts]


def plan_with_experts(entries, budget_bytes: Optional[int], policy: str, prefetch_depth: int,
                      cache_entries: Optional[int], layers: Sequence[str], num_experts: int,
                      slot_bytes: int, expert_policy: str = "lfu"
                      ) -> Tuple[CachePlan, ExpertPlan]:
    """Split the budget: the plain weights first (every token reads them), experts after.

    One expert slot per layer is set aside before the plain weights are planned, so
    the experts always have room; what the plain weights leave goes to more slots.
    """
    if not layers:
        return plan_cache(entries, budget_bytes, policy, prefetch_depth, cache_entries), \
            ExpertPlan(expert_policy)
    expert_floor = len(layers) * slot_bytes
    if budget_bytes is not None and cache_entries is None:
        floor = plan_cache(entries, None, policy, prefetch_depth).minimum_budget
        if budget_bytes < floor + expert_floor:
            raise ConfigError(
                f"GPU budget {format_bytes(budget_bytes)} is below the minimum of "
                f"{format_bytes(floor + expert_floor)} for this mixture-of-experts model "
                f"({format_bytes(floor)} for the plain weights with policy {policy}, plus "
                f"{format_bytes(expert_floor)} for one expert per layer); raise --gpu-budget")
        budget_bytes -= expert_floor
    plan = plan_cache(entries, budget_bytes, policy, prefetch_depth, cache_entries)
    room = None if budget_bytes is None else budget_bytes - plan.arena_bytes + expert_floor
    return plan, plan_experts(layers, num_experts, slot_bytes, room, expert_policy)
