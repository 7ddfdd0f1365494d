"""The cache policy as a pure function: which weights stay resident, how big the ring is.

Decoding walks the linears in the same cyclic order every token. Under a cyclic
scan larger than the cache, LRU-like eviction almost never hits; the optimal
policy keeps a fixed subset resident and streams the rest through a small ring of
staging slots, so the hit rate is resident/total. That is ``static``; ``lru`` is
the classic N-entry cache, kept for comparison. The planner and the runtime cache
both call :func:`plan_cache`, so predictions and runs agree by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from ..errors import ConfigError
from ..units import format_bytes
from .sizes import aligned
from .words import POLICIES  # noqa: F401  (re-exported: callers import it from here)


@dataclass
class CachePlan:
    """How the device arena is split between resident weights and staging slots."""

    policy: str
    prefetch_depth: int
    resident: List[str] = field(default_factory=list)  # held for the whole run, in order
    slot_count: int = 0  # staging slots for streamed weights
    slot_bytes: int = 0  # each slot holds the largest weight
    total_bytes: int = 0  # every cacheable weight, as held on the device
    resident_bytes: int = 0
    minimum_budget: int = 0
    total_copy_bytes: int = 0  # every cacheable weight, as copied host->device
    resident_copy_bytes: int = 0

    @property
    def arena_bytes(self) -> int:
        return self.resident_bytes + self.slot_count * self.slot_bytes

    @property
    def streamed_bytes(self) -> int:
        """Bytes host->device per forward pass under the static policy."""
        return self.total_copy_bytes - self.resident_copy_bytes


def plan_cache(entries: Sequence[Tuple[str, int, int]], budget_bytes: Optional[int],
               policy: str = "static", prefetch_depth: int = 2,
               cache_entries: Optional[int] = None) -> CachePlan:
    """Plan the arena for ``entries`` = [(name, held bytes, copy bytes)] in execution order.

    Held bytes are what a weight takes in the arena (packed or dequantized); copy
    bytes are what crosses from host to device to fill it (always the packed form).
    ``budget_bytes`` None means unbounded. ``cache_entries`` (the classic recipe's
    knob) sets the budget to that many slots of the largest weight.
    """
    if policy not in POLICIES:
        raise ConfigError(f"unknown --policy {policy!r}: use one of {', '.join(POLICIES)}")
    if prefetch_depth < 0:
        raise ConfigError(f"--prefetch-depth must be 0 or more, got {prefetch_depth}")
    sizes = [(name, aligned(held)) for name, held, _ in entries]
    copy_bytes = {name: nbytes for name, _, nbytes in entries}
    largest = max((size for _, size in sizes), default=0)
    slots_needed = min(prefetch_depth + 1, len(sizes))
    plan = CachePlan(policy, prefetch_depth, total_bytes=sum(s for _, s in sizes),
                     total_copy_bytes=sum(copy_bytes.values()))
    if policy == "static":
        plan.minimum_budget = min((_static_floor(sizes, cap, slots_needed)
                                   for cap in _slot_caps(sizes)), default=0)
    else:
        plan.minimum_budget = slots_needed * largest
    if cache_entries is not None:
        if cache_entries < slots_needed:
            raise ConfigError(
                f"--cache-entries {cache_entries} is below the minimum of {slots_needed} "
                f"(prefetch depth {prefetch_depth} + 1); raise it or lower --prefetch-depth"
            )
        budget_bytes = cache_entries * largest
    if budget_bytes is not None and budget_bytes < plan.minimum_budget:
        raise ConfigError(
            f"GPU budget {format_bytes(budget_bytes)} is below the minimum of "
            f"{format_bytes(plan.minimum_budget)} for policy {policy} ({slots_needed} staging "
            "slots, plus any weight larger than a slot kept resident); raise --gpu-budget or "
            "lower --prefetch-depth"
        )
    if policy == "static":
        _plan_static(plan, sizes, budget_bytes, slots_needed)
    else:
        _plan_lru(plan, sizes, budget_bytes, largest, cache_entries)
    plan.resident_copy_bytes = sum(copy_bytes[name] for name in plan.resident)
    return plan


def _slot_caps(sizes) -> List[int]:
    """Candidate slot sizes: each distinct weight size, largest first."""
    return sorted({size for _, size in sizes}, reverse=True)


def _static_floor(sizes, cap: int, slots_needed: int) -> int:
    """Least budget with slots of ``cap`` bytes: every larger weight must be resident."""
    return sum(size for _, size in sizes if size > cap) + slots_needed * cap


def _plan_static(plan, sizes, budget_bytes, slots_needed) -> None:
    """Maximise resident bytes; the ring's slots fit the largest weight left streaming.

    A slot as large as the largest weight would waste memory when that weight (the
    lm_head, say, 5x an MLP matrix in a 32B model) could stay resident, so every
    distinct weight size is tried as the slot size and the best split is kept.
    """
    if budget_bytes is None or budget_bytes >= plan.total_bytes:
        plan.resident = [name for name, _ in sizes]
        plan.resident_bytes = plan.total_bytes
        return
    best = None
    for cap in _slot_caps(sizes):
        floor = _static_floor(sizes, cap, slots_needed)
        if floor > budget_bytes:
            continue
        room = budget_bytes - floor
        resident = {name for name, size in sizes if size > cap}
        for name, size in sizes:  # first fit in execution order
            if name not in resident and size <= room:
                resident.add(name)
                room -= size
        kept = sum(size for name, size in sizes if name in resident)
        if best is None or kept > best[0]:
            best = (kept, resident)
    kept, resident = best
    plan.resident = [name for name, _ in sizes if name in resident]
    plan.resident_bytes = kept
    streamed = [size for name, size in sizes if name not in resident]
    plan.slot_count = slots_needed if streamed else 0
    plan.slot_bytes = max(streamed, default=0)


def _plan_lru(plan, sizes, budget_bytes, slot_bytes, cache_entries) -> None:
    if cache_entries is not None:
        count = cache_entries
    elif budget_bytes is None:
        count = len(sizes)
    else:
        count = budget_bytes // slot_bytes if slot_bytes else 0
    plan.slot_count = min(count, len(sizes))
    plan.slot_bytes = slot_bytes


def choose_victim(policy: str, candidates):
    """The staging slot to refill, among slots that nothing needs right now.

    ``candidates`` are slots with ``holder`` (name or None) and ``last_used`` (a tick).
    An empty slot is always taken first. Otherwise ``lru`` evicts the least recently
    used weight: under cyclic access that is exactly the one needed soonest after
    the prefetch window, which is why it thrashes and ``static`` does not.
    """
    empty = [slot for slot in candidates if slot.holder is None]
    if empty:
        return empty[0]
    if not candidates:
        return None
    return min(candidates, key=lambda slot: slot.last_used)


def drops_after_use(policy: str) -> bool:
    """Whether a streamed weight leaves its slot as soon as its compute is done.

    Under ``static`` the ring is use-once: a streamed weight is copied exactly once
    per pass, so bytes per token equal streamed bytes. ``lru`` keeps it until evicted.
    """
    return policy == "static"
