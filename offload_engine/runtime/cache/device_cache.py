"""The bounded device cache: one arena, resident weights, staging slots, counters.

The compute thread calls :meth:`DeviceCache.acquire` / :meth:`release` around each
linear; the prefetch worker calls :meth:`next_job` / :meth:`finish_job`. All shared
state is guarded by one condition variable; waits are on it, never on sleeps.
Which weights stay resident and which slot is refilled are decided in
:mod:`offload_engine.planning.policy` alone.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from threading import Condition
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from ...errors import WorkerError
from ...planning.expert_policy import ExpertPlan
from ...planning.policy import CachePlan, choose_victim, drops_after_use
from ...planning.sizes import held_nbytes
from ..prefetch import Copier, CopyJob, PrefetchWorker
from ..ranges import WAIT, profiled
from .arena import Held, carve
from .expert_cache import ExpertCache

logger = logging.getLogger(__name__)
JOIN_TIMEOUT_S = 10.0
WAIT_POLL_S = 0.05  # how often a waiting caller re-checks that the worker is alive


@dataclass
class CacheStats:
    """Counters since the cache was built (or last reset)."""

    hits: int = 0  # uses served without a copy for that use
    misses: int = 0  # uses that needed a host-to-device copy
    h2d_bytes: int = 0  # bytes copied host->device for weights that were then used
    copied_bytes: int = 0  # every byte copied, prefetches never used included
    evictions: int = 0  # loaded weights replaced by another
    stall_seconds: float = 0.0  # compute thread waiting for a copy
    passes: int = 0  # uses of the first weight in the execution order (≈ forward passes)
    disk_bytes: int = 0  # of h2d_bytes, those read from the shard files (host budget)
    # mixture-of-experts layers (all 0 for a dense model); the counts above include them
    expert_hits: int = 0  # experts a layer used that were on the device
    expert_misses: int = 0  # experts copied host->device for a use (experts fetched)
    expert_evictions: int = 0
    expert_h2d_bytes: int = 0  # of h2d_bytes, the experts'
    expert_tokens: int = 0  # tokens through the first experts layer (the per-token base)
    # next-layer expert prefetch (--expert-prefetch on): the guesses and what they saved
    expert_predicted: int = 0  # experts named by the guesses of the next layer's experts
    expert_predicted_used: int = 0  # of those, experts the layer's router then picked
    expert_prefetches: int = 0  # experts the prefetch worker copied (used or not)
    expert_prefetch_hits: int = 0  # of expert_misses, fetches a prefetch had already made
    expert_cpu: int = 0  # experts computed on the CPU from host RAM (--placement experts-cpu)

    @property
    def hit_rate(self) -> float:
        uses = self.hits + self.misses
        return self.hits / uses if uses else 0.0

    @property
    def expert_hit_rate(self) -> float:
        """Expert uses served by the device, of all (fetched or computed on the CPU)."""
        uses = self.expert_hits + self.expert_misses + self.expert_cpu
        return self.expert_hits / uses if uses else 0.0

    def as_dict(self) -> dict:
        tokens = self.expert_tokens
        return {**asdict(self), "hit_rate": self.hit_rate,
                "expert_hit_rate": self.expert_hit_rate,
                "expert_bytes_per_token": self.expert_h2d_bytes / tokens if tokens else 0.0,
                "experts_fetched_per_token": self.expert_misses / tokens if tokens else 0.0,
                "expert_prefetch_accuracy": (self.expert_predicted_used / self.expert_predicted
                                             if self.expert_predicted else 0.0)}


class Slot:
    """One staging slot of the arena."""

    def __init__(self, index: int, offset: int, copier: Copier):
        self.index = index
        self.offset = offset
        self.holder: Optional[str] = None  # name of the weight in (or loading into) it
        self.loading = False
        self.fresh = False  # loaded and not used yet: its first use is a miss
        self.in_use = 0
        self.last_used = 0
        self.held: Optional[Held] = None
        self.error: Optional[BaseException] = None
        self.ready_event = copier.new_event()
        self.free_event = None  # recorded on the compute stream when its reader is queued


@dataclass
class Handle:
    """What :meth:`DeviceCache.acquire` returns: the weight, and where it lives."""

    name: str
    weight: Held
    slot: Optional[Slot]


class DeviceCache:
    def __init__(self, store, order: Sequence[str], plan: CachePlan, device: torch.device,
                 cache_format: str, dtype: torch.dtype, progress: bool = True,
                 experts: Optional[Tuple[ExpertPlan, dict]] = None,
                 expert_prefetch: bool = False, experts_on_cpu: bool = False):
        """``experts``: (plan, {experts module: {expert: its matrices' names}}) for a
        mixture-of-experts model; those weights are not in ``order``. ``expert_prefetch``:
        copy the guessed experts of the next layer on a worker of their own.
        ``experts_on_cpu``: the experts not in the slots are computed on the CPU."""
        self.store, self.plan, self.device = store, plan, torch.device(device)
        self.cache_format, self.dtype = cache_format, dtype
        self.order = list(order)
        self.stats = CacheStats()
        self._cond = Condition()
        self._closed = False
        self._demand: Optional[str] = None
        self._tick = 0
        self._location: Dict[str, Slot] = {}
        self._copier = Copier(self.device)
        expert_bytes = experts[0].arena_bytes if experts else 0
        self.arena = torch.empty(plan.arena_bytes + expert_bytes, dtype=torch.uint8,
                                 device=self.device)
        self.resident: Dict[str, Held] = {}
        self._load_resident(progress)
        self.experts = (ExpertCache(store, experts[0], experts[1], self.arena,
                                    plan.arena_bytes, self._copier, cache_format, dtype,
                                    lambda: self.stats, expert_prefetch, experts_on_cpu)
                        if experts else None)
        self._resident_handles = {name: Handle(name, held, None)
                                  for name, held in self.resident.items()}
        resident = set(self.resident)
        self._stream_order = [name for name in self.order if name not in resident]
        self._stream_pos = {name: i for i, name in enumerate(self._stream_order)}
        self._next_stream = self._next_stream_positions()
        self._order_index = {name: i for i, name in enumerate(self.order)}
        self._cursor = 0
        self.inlined: frozenset = frozenset()  # --compile: weights traced as constants
        base = plan.resident_bytes
        self.slots = [Slot(i, base + i * plan.slot_bytes, self._copier)
                      for i in range(plan.slot_count if self._stream_order else 0)]
        self._worker = PrefetchWorker(self, self._copier)
        self._worker_error: Optional[BaseException] = None
        if self._stream_order:
            self._worker.start()

    # ----- setup -------------------------------------------------------------
    def _load_resident(self, progress: bool) -> None:
        offset = 0
        names = self.plan.resident
        for name in tqdm(names, desc="loading resident weights", unit="weight",
                         disable=not progress or not names):
            weight = self.store[name]
            held = carve(self.arena, offset, weight, self.cache_format, self.dtype)
            self._copier.run(CopyJob(name, weight, held, None, self._copier.new_event()))
            self.resident[name] = held
            offset += held_nbytes(weight, self.cache_format, self.dtype)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _next_stream_positions(self) -> List[int]:
        """For each order position, the stream position of the next streamed weight."""
        positions, following = [0] * len(self.order), 0
        for i in range(len(self.order) - 1, -1, -1):
            name = self.order[i]
            if name in self._stream_pos:
                following = self._stream_pos[name]
            positions[i] = following
        return positions

    # ----- compute side --------------------------------------------------------
    def acquire(self, name: str) -> Handle:
        """The weight ``name`` on the device, waiting for its copy if needed."""
        index = self._order_index.get(name)
        if index is None:
            raise KeyError(f"weight {name!r} is not managed by this cache")
        if index == 0:
            self.stats.passes += 1  # counters are written by this thread only
        handle = self._resident_handles.get(name)
        if handle is not None:  # the hot path of a resident weight takes no lock...
            self.stats.hits += 1
            if self._stream_order and self._next_stream[index] != self._cursor:
                with self._cond:  # ...unless the prefetch window moves
                    self._advance(index)
            return handle
        with self._cond:
            self._advance(index)
            slot = self._wait_ready(name)
        if slot.ready_event is not None:
            torch.cuda.current_stream(self.device).wait_event(slot.ready_event)
        return Handle(name, slot.held, slot)

    def permanent_weight(self, name: str):
        """The held weight ``name`` when it stays where it is for the cache's whole life
        (resident, and nothing streams to move the prefetch window), else None."""
        if self._stream_order or self.experts is not None:
            return None
        handle = self._resident_handles.get(name)
        return None if handle is None else handle.weight

    def count_uses(self, names, passes: int) -> None:
        """Count ``passes`` uses of each resident weight in ``names`` made without acquire
        (a compiled step that traced them as constants)."""
        self.stats.hits += len(names) * passes
        if self.order and self.order[0] in names:
            self.stats.passes += passes

    def release(self, handle: Handle) -> None:
        """The compute reading ``handle`` is queued; its slot may be refilled after it."""
        slot = handle.slot
        if slot is None:
            return
        with self._cond:
            slot.in_use -= 1
            if self.device.type == "cuda":
                slot.free_event = torch.cuda.current_stream(self.device).record_event()
            if slot.in_use == 0 and drops_after_use(self.plan.policy):
                self._move_cursor_past(slot.holder)
                self._location.pop(slot.holder, None)
                slot.holder, slot.held = None, None
            self._cond.notify_all()

    def _advance(self, index: int) -> None:
        """The compute is at order position ``index``: slide the prefetch window there."""
        if self._stream_order:
            self._cursor = self._next_stream[index]
            self._cond.notify_all()

    def _move_cursor_past(self, name: str) -> None:
        """A use-once weight is done: the window must not ask for it again this pass."""
        position = self._stream_pos[name]
        if self._cursor == position:
            self._cursor = (position + 1) % len(self._stream_order)

    def _wait_ready(self, name: str) -> Slot:
        if name not in self._location:
            self._demand = name
            self._cond.notify_all()
        started = time.perf_counter()
        waited = False
        try:
            with profiled(WAIT):
                while True:
                    self._raise_if_worker_dead(name)
                    slot = self._location.get(name)
                    if slot is not None and not slot.loading:
                        break
                    waited = True
                    self._cond.wait(WAIT_POLL_S)
        finally:  # also on Ctrl-C: a stale demand would make the worker fetch it for nothing
            if self._demand == name:
                self._demand = None
        if waited:
            self.stats.stall_seconds += time.perf_counter() - started
        if slot.error is not None:
            error = slot.error
            self._drop(slot)
            raise WorkerError(f"fetching weight {name!r} to {self.device} failed: "
                              f"{type(error).__name__}: {error}") from error
        self._count_use(slot)
        return slot

    def _count_use(self, slot: Slot) -> None:
        if slot.fresh:
            self.stats.misses += 1
            self.stats.h2d_bytes += self.store.describe(slot.holder).nbytes
            self.stats.disk_bytes += self.store.disk_nbytes(slot.holder)
            slot.fresh = False
        else:
            self.stats.hits += 1
        slot.in_use += 1
        self._tick += 1
        slot.last_used = self._tick

    def _raise_if_worker_dead(self, name: str) -> None:
        if self._closed:
            raise WorkerError(f"weight {name!r} requested after the engine was closed")
        if self._worker_error is not None or not self._worker.is_alive():
            cause = self._worker_error
            raise WorkerError(f"the prefetch worker died before weight {name!r} was copied: "
                              f"{type(cause).__name__ if cause else 'exited'}: {cause}") from cause

    def _drop(self, slot: Slot) -> None:
        self._location.pop(slot.holder, None)
        slot.holder, slot.held, slot.error, slot.fresh = None, None, None, False

    # ----- worker side -----------------------------------------------------------
    def next_job(self) -> Optional[CopyJob]:
        """Block until there is a weight to copy and a slot for it; None when closed."""
        with self._cond:
            while not self._closed:
                job = self._pick_job()
                if job is not None:
                    return job
                self._cond.wait()
        return None

    def _window(self) -> List[str]:
        count = len(self._stream_order)
        depth = min(self.plan.prefetch_depth + 1, count)
        return [self._stream_order[(self._cursor + i) % count] for i in range(depth)]

    def _pick_job(self) -> Optional[CopyJob]:
        window = self._window()
        targets = ([self._demand] if self._demand else []) + window
        protected = set(targets)
        for name in targets:
            if name in self._location:
                continue
            free = [s for s in self.slots if s.in_use == 0 and not s.loading
                    and (s.holder is None or s.holder not in protected)]
            slot = choose_victim(self.plan.policy, free)
            if slot is None:
                return None
            return self._assign(slot, name)
        return None

    def _assign(self, slot: Slot, name: str) -> CopyJob:
        if slot.holder is not None:
            self.stats.evictions += 1
            self._location.pop(slot.holder, None)
        weight = self.store.describe(name)  # shapes only: a weight on disk is not read here
        slot.holder, slot.loading, slot.fresh, slot.error = name, True, True, None
        slot.held = carve(self.arena, slot.offset, weight, self.cache_format, self.dtype)
        self._location[name] = slot
        return CopyJob(name, self.store.source(name), slot.held, slot.free_event,
                       slot.ready_event)

    def finish_job(self, job: CopyJob, error: Optional[BaseException]) -> None:
        with self._cond:
            slot = self._location.get(job.name)
            if slot is not None:
                slot.loading = False
                slot.error = error
                if error is None:
                    self.stats.copied_bytes += job.source.nbytes
            self._cond.notify_all()

    def worker_died(self, error: BaseException) -> None:
        with self._cond:
            self._worker_error = error
            self._cond.notify_all()

    # ----- lifecycle ---------------------------------------------------------------
    def reset_stats(self) -> None:
        with self._cond:
            self.stats = CacheStats()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._worker.is_alive():
            self._worker.join(JOIN_TIMEOUT_S)
            if self._worker.is_alive():
                raise WorkerError("the prefetch worker did not stop within "
                                  f"{JOIN_TIMEOUT_S:.0f} s of close()")
        if self.experts is not None:
            self.experts.close()
        self.resident.clear()
        self._resident_handles.clear()
        self.experts = None
        self.slots = []
        self.arena = torch.empty(0, dtype=torch.uint8, device=self.device)
