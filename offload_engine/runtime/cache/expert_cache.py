"""The expert part of the device arena: per experts layer, a few slots of one expert each.

Which experts a token needs is known only once its router has run, so experts are
fetched on demand by the compute thread (one copy per matrix, on the copy stream on
CUDA, ordered with events like the weight ring's), and only the experts the router
selected are fetched. Which expert leaves a full layer is decided by
:func:`offload_engine.planning.expert_policy.choose_expert_victim`. When every expert
fits (``slots_per_layer == num_experts``) all of them are loaded once, up front.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ...errors import WorkerError
from ...planning.expert_policy import ExpertPlan, choose_expert_victim
from ...planning.sizes import aligned, held_nbytes
from ..prefetch import Copier, CopyJob
from .arena import Held, carve

logger = logging.getLogger(__name__)


class ExpertSlot:
    """Room for one expert's matrices in the arena."""

    def __init__(self, offset: int, copier: Copier):
        self.offset = offset
        self.holder: Optional[int] = None  # expert index
        self.held: List[Held] = []
        self.in_use = False
        self.last_used = 0
        self.ready_event = copier.new_event()
        self.free_event = None


class _Layer:
    def __init__(self, names: Dict[int, Sequence[str]], slots: List[ExpertSlot]):
        self.names = names  # expert -> its matrices' weight names
        self.slots = slots
        self.where: Dict[int, ExpertSlot] = {}
        self.uses: Dict[int, int] = {}


class ExpertCache:
    """Acquire one expert's matrices on the device; count hits, misses and bytes."""

    def __init__(self, store, plan: ExpertPlan, names: Dict[str, Dict[int, Sequence[str]]],
                 arena: torch.Tensor, offset: int, copier: Copier, cache_format: str,
                 dtype: torch.dtype, stats: Callable[[], object]):
        self.store, self.plan, self.arena = store, plan, arena
        self.copier, self.cache_format, self.dtype = copier, cache_format, dtype
        self._stats = stats  # the weight cache's CacheStats (replaced on reset)
        self._tick = 0
        self.layers: Dict[str, _Layer] = {}
        for layer in plan.layers:
            slots = []
            for _ in range(plan.slots_per_layer):
                slots.append(ExpertSlot(offset, copier))
                offset += plan.slot_bytes
            self.layers[layer] = _Layer(names[layer], slots)
        if plan.all_resident:
            self._load_all()

    def _load_all(self) -> None:
        for layer in self.layers.values():
            for expert, slot in zip(sorted(layer.names), layer.slots, strict=True):
                self._fill(layer, slot, expert)
        if self.arena.device.type == "cuda":
            torch.cuda.synchronize(self.arena.device)

    def on_device(self, layer_name: str):
        """The experts of ``layer_name`` held on the device now."""
        return self.layers[layer_name].where.keys()

    def count_tokens(self, tokens: int) -> None:
        """Called once per forward by the first experts layer: the per-token denominators."""
        self._stats().expert_tokens += tokens

    def acquire(self, layer_name: str, expert: int) -> List[Held]:
        """Expert ``expert`` of ``layer_name`` on the device, copying it if it is not there."""
        layer = self.layers[layer_name]
        stats = self._stats()
        self._tick += 1
        layer.uses[expert] = layer.uses.get(expert, 0) + 1
        slot = layer.where.get(expert)
        if slot is not None:
            stats.expert_hits += 1
            stats.hits += len(slot.held)
        else:
            free = [s for s in layer.slots if not s.in_use]
            slot = choose_expert_victim(self.plan.policy, free, layer.uses)
            if slot is None:
                raise WorkerError(f"{layer_name}: no free expert slot for expert {expert} "
                                  "(every slot is in use); this is a bug")
            if slot.holder is not None:
                stats.expert_evictions += 1
                del layer.where[slot.holder]
            copied = self._fill(layer, slot, expert)
            stats.expert_misses += 1
            stats.misses += len(slot.held)
            stats.h2d_bytes += copied
            stats.copied_bytes += copied
            stats.expert_h2d_bytes += copied
            stats.disk_bytes += sum(self.store.disk_nbytes(n) for n in layer.names[expert])
        if slot.ready_event is not None:
            torch.cuda.current_stream(self.arena.device).wait_event(slot.ready_event)
        slot.in_use, slot.last_used = True, self._tick
        return slot.held

    def release(self, layer_name: str, expert: int) -> None:
        slot = self.layers[layer_name].where[expert]
        slot.in_use = False
        if self.arena.device.type == "cuda":
            slot.free_event = torch.cuda.current_stream(self.arena.device).record_event()

    def _fill(self, layer: _Layer, slot: ExpertSlot, expert: int) -> int:
        """Copy ``expert``'s matrices into ``slot``; the bytes copied host->device."""
        offset, held, copied = slot.offset, [], 0
        for name in layer.names[expert]:
            weight = self.store.describe(name)
            target = carve(self.arena, offset, weight, self.cache_format, self.dtype)
            try:
                # store[name]: host RAM, or (under --host-budget) a direct read from the
                # shards; the disk ring reads ahead in cyclic order, which experts lack
                self.copier.run(CopyJob(name, self.store[name], target,
                                        slot.free_event, slot.ready_event))
            except Exception as exc:
                slot.holder, slot.held = None, []
                raise WorkerError(f"fetching expert weight {name!r} to {self.arena.device} "
                                  f"failed: {type(exc).__name__}: {exc}") from exc
            held.append(target)
            copied += weight.nbytes
            offset += aligned(held_nbytes(weight, self.cache_format, self.dtype))
        slot.holder, slot.held = expert, held
        layer.where[expert] = slot
        return copied


def expert_counters(before: dict, after: dict) -> dict:
    """The expert counters between two ``CacheStats.as_dict()`` snapshots; {} without
    expert work (a dense model)."""
    tokens = after.get("expert_tokens", 0) - before.get("expert_tokens", 0)
    if tokens <= 0:
        return {}
    hits = after["expert_hits"] - before["expert_hits"]
    misses = after["expert_misses"] - before["expert_misses"]
    copied = after["expert_h2d_bytes"] - before["expert_h2d_bytes"]
    return {"expert_hit_rate": hits / (hits + misses) if hits + misses else 0.0,
            "expert_bytes_per_token": copied / tokens,
            "experts_fetched_per_token": misses / tokens,
            "experts_used_per_token": (hits + misses) / tokens}
