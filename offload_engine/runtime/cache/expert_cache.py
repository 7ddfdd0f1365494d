"""The expert part of the device arena: per experts layer, a few slots of one expert each.

Which experts a token needs is known only once its router has run. The compute thread
fetches a routed expert that is not on the device itself (one copy per matrix, on the
copy stream on CUDA, ordered with events like the weight ring's). With prefetch on,
each experts layer also hands over a guess of the next layer's experts (its router
applied to this layer's input, runtime/experts.py): a background worker
(:class:`offload_engine.runtime.prefetch.PrefetchWorker`, this cache as its scheduler)
copies them into the next layer's slots while this layer computes. Which expert leaves a
full layer is decided by :func:`offload_engine.planning.expert_policy.choose_expert_victim`
for both threads. When every expert fits (``slots_per_layer == num_experts``) all of them
are loaded once, up front, and nothing is prefetched.

Slot state is shared by the two threads under one condition variable: a slot being
filled is ``loading`` (never a victim; a compute thread that needs it waits), one being
read is ``in_use``. The slots are the arena's bytes, carved once: no thread can hold more
experts than the budget has slots. A failed prefetch copy is raised in the compute
thread at its next call, whether or not the guess was used.
"""

from __future__ import annotations

import logging
import time
from threading import Condition
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ...errors import WorkerError
from ...planning.expert_policy import ExpertPlan, choose_expert_victim, choose_prefetch_victim
from ...planning.sizes import aligned, held_nbytes
from ..prefetch import Copier, CopyJob, PrefetchWorker
from ..ranges import WAIT, profiled
from .arena import Held, carve
from .expert_jobs import ExpertCopier, ExpertJob, WorkerCounts

logger = logging.getLogger(__name__)
WAIT_POLL_S = 0.05  # how often a waiting compute thread re-checks that the worker is alive
JOIN_TIMEOUT_S = 10.0


class ExpertSlot:
    """Room for one expert's matrices in the arena."""

    def __init__(self, offset: int, copier: Copier):
        self.offset = offset
        self.holder: Optional[int] = None  # expert index
        self.held: List[Held] = []
        self.in_use = False
        self.loading = False  # being filled (by either thread): not a victim, not readable
        self.prefetched = False  # filled by the prefetch worker and not used since
        self.last_used = 0
        self.ready_event = copier.new_event()
        self.free_event = None


class _Layer:
    def __init__(self, names: Dict[int, Sequence[str]], slots: List[ExpertSlot]):
        self.names = names  # expert -> its matrices' weight names
        self.slots = slots
        self.where: Dict[int, ExpertSlot] = {}
        self.uses: Dict[int, int] = {}
        self.guess: Optional[List[int]] = None  # the last prediction of this layer's experts


class ExpertCache:
    """Acquire one expert's matrices on the device; count hits, misses, bytes, guesses."""

    def __init__(self, store, plan: ExpertPlan, names: Dict[str, Dict[int, Sequence[str]]],
                 arena: torch.Tensor, offset: int, copier: Copier, cache_format: str,
                 dtype: torch.dtype, stats: Callable[[], object], prefetch: bool = False,
                 cold_on_cpu: bool = False):
        """``cold_on_cpu`` (--placement experts-cpu): the slots hold a fixed set of experts,
        the lowest-numbered of each layer, loaded here; the others are computed on the CPU
        by the caller, never copied."""
        self.store, self.plan, self.arena = store, plan, arena
        self.copier, self.cache_format, self.dtype = copier, cache_format, dtype
        self._stats = stats  # the weight cache's CacheStats (replaced on reset)
        self._tick = 0
        self._cond = Condition()
        # layer -> (experts still to prefetch, best first; all the experts of the guess)
        self._requests: Dict[str, Tuple[List[int], frozenset]] = {}
        self._failed: Optional[ExpertJob] = None  # a prefetch that failed, not yet raised
        self._error: Optional[BaseException] = None
        self._worker_error: Optional[BaseException] = None
        self._closed = False
        self._done = WorkerCounts()
        self.layers: Dict[str, _Layer] = {}
        for layer in plan.layers:
            slots = []
            for _ in range(plan.slots_per_layer):
                slots.append(ExpertSlot(offset, copier))
                offset += plan.slot_bytes
            self.layers[layer] = _Layer(names[layer], slots)
        self.cold_on_cpu = cold_on_cpu and not plan.all_resident
        if plan.all_resident or self.cold_on_cpu:
            self._load_all()
        self.prefetching = bool(prefetch and plan.layers and not plan.all_resident
                                and not self.cold_on_cpu)
        self._worker = PrefetchWorker(self, ExpertCopier(copier))
        self._worker.thread.name = "offload-expert-prefetch"
        if self.prefetching:
            self._worker.start()

    def _load_all(self) -> None:
        for layer in self.layers.values():
            for expert, slot in zip(sorted(layer.names), layer.slots, strict=False):
                slot.held = self._copy_in(layer, slot, expert)[0]
                slot.holder = expert
                layer.where[expert] = slot
        if self.arena.device.type == "cuda":
            torch.cuda.synchronize(self.arena.device)

    def summary(self) -> dict:
        """The expert cache's layout, as plain numbers (engine stats)."""
        plan = self.plan
        return {"expert_policy": plan.policy, "expert_prefetch": self.prefetching,
                "expert_layers": len(plan.layers),
                "experts_per_layer": plan.num_experts,
                "expert_slots_per_layer": plan.slots_per_layer,
                "expert_arena_bytes": plan.arena_bytes,
                "expert_minimum_bytes": plan.minimum_bytes}

    def cold_names(self) -> List[str]:
        """With cold_on_cpu, the matrices of every expert the device does not hold."""
        if not self.cold_on_cpu:
            return []
        return [name for layer in self.layers.values() for expert, names in
                sorted(layer.names.items()) if expert not in layer.where for name in names]

    # ----- compute side ----------------------------------------------------------
    def count_tokens(self, tokens: int) -> None:
        """Called once per forward by the first experts layer: the per-token denominators."""
        self._stats().expert_tokens += tokens

    def begin(self, layer_name: str, routed: Sequence[int]) -> frozenset:
        """A layer starts computing ``routed``: its pending prefetch is dropped (too late),
        the guess made for it is scored, and the experts on the device (or on their way
        there) are returned, to be computed first."""
        layer = self.layers[layer_name]
        with self._cond:
            self._raise_failures(layer_name)
            self._requests.pop(layer_name, None)
            self._fold()
            if self.cold_on_cpu:
                self._stats().expert_cpu += sum(1 for e in routed if e not in layer.where)
            if layer.guess is not None:
                stats = self._stats()
                stats.expert_predicted += len(layer.guess)
                stats.expert_predicted_used += len(set(layer.guess) & set(routed))
                layer.guess = None
            return frozenset(layer.where)

    def prefetch(self, layer_name: str, guess: Sequence[int]) -> None:
        """The experts ``layer_name`` will likely use, best first: remember the guess (to
        score it) and queue the copies of as many as the layer has slots for."""
        layer = self.layers[layer_name]
        layer.guess = list(guess)
        if not self.prefetching:
            return
        with self._cond:
            self._raise_failures(layer_name)
            wanted = list(guess)[:self.plan.slots_per_layer]
            self._requests[layer_name] = wanted, frozenset(wanted)
            self._cond.notify_all()

    def acquire(self, layer_name: str, expert: int) -> List[Held]:
        """Expert ``expert`` of ``layer_name`` on the device, copying it if it is not there."""
        layer = self.layers[layer_name]
        stats = self._stats()
        claimed = False
        with self._cond:
            self._raise_failures(layer_name)
            self._tick += 1
            layer.uses[expert] = layer.uses.get(expert, 0) + 1
            slot = layer.where.get(expert)
            if slot is None:
                slot, claimed = self._claim(layer_name, layer, expert), True
            else:
                self._wait_loaded(layer_name, expert, slot)
                if slot.prefetched:  # copied by the worker: a fetch, overlapped with compute
                    slot.prefetched = False
                    stats.expert_prefetch_hits += 1
                    self._count_fetch(layer, slot, expert, copied_here=False)
                else:
                    stats.expert_hits += 1
                    stats.hits += len(slot.held)
            slot.in_use, slot.last_used = True, self._tick
        if claimed:  # the compute thread copies it now, outside the lock
            self._fetch(layer_name, layer, slot, expert)
        if slot.ready_event is not None:
            torch.cuda.current_stream(self.arena.device).wait_event(slot.ready_event)
        return slot.held

    def release(self, layer_name: str, expert: int) -> None:
        with self._cond:
            slot = self.layers[layer_name].where[expert]
            slot.in_use = False
            if self.arena.device.type == "cuda":
                slot.free_event = torch.cuda.current_stream(self.arena.device).record_event()
            self._cond.notify_all()

    def _claim(self, layer_name: str, layer: _Layer, expert: int) -> ExpertSlot:
        """A slot for a missing expert, marked loading (called with the lock held)."""
        while True:
            free = [s for s in layer.slots if not s.in_use and not s.loading]
            slot = choose_expert_victim(self.plan.policy, free, layer.uses)
            if slot is not None:
                break
            if not any(s.loading for s in layer.slots):
                raise WorkerError(f"{layer_name}: no free expert slot for expert {expert} "
                                  "(every slot is in use); this is a bug")
            self._wait(layer_name, expert)  # a prefetch is filling the only free slots
        if slot.holder is not None:
            self._stats().expert_evictions += 1
            del layer.where[slot.holder]
        slot.holder, slot.held, slot.loading, slot.prefetched = expert, [], True, False
        layer.where[expert] = slot
        return slot

    def _fetch(self, layer_name: str, layer: _Layer, slot: ExpertSlot, expert: int) -> None:
        """Copy a claimed expert on the compute thread, outside the lock."""
        try:
            held, _copied = self._copy_in(layer, slot, expert)
        except BaseException:
            with self._cond:
                self._drop(layer, slot)
                self._cond.notify_all()
            raise
        with self._cond:
            slot.held, slot.loading = held, False
            self._count_fetch(layer, slot, expert, copied_here=True)
            self._cond.notify_all()

    def _count_fetch(self, layer: _Layer, slot: ExpertSlot, expert: int,
                     copied_here: bool) -> None:
        stats = self._stats()
        copied = sum(self.store.describe(n).nbytes for n in layer.names[expert])
        stats.expert_misses += 1
        stats.misses += len(slot.held)
        stats.h2d_bytes += copied
        stats.expert_h2d_bytes += copied
        if copied_here:  # the worker's copies reach copied_bytes through _fold
            stats.copied_bytes += copied
        stats.disk_bytes += sum(self.store.disk_nbytes(n) for n in layer.names[expert])

    def _wait_loaded(self, layer_name: str, expert: int, slot: ExpertSlot) -> None:
        """Wait (lock held) until a prefetch filling ``slot`` is done; raise its error."""
        if not slot.loading:
            return
        started = time.perf_counter()
        with profiled(WAIT):
            while slot.loading and slot.holder == expert:
                self._wait(layer_name, expert)
        self._stats().stall_seconds += time.perf_counter() - started
        self._raise_failures(layer_name)

    def _wait(self, layer_name: str, expert: int) -> None:
        if self._closed:
            raise WorkerError(f"expert {expert} of {layer_name} requested after the engine "
                              "was closed")
        if self._worker_error is not None or not self._worker.is_alive():
            cause = self._worker_error
            raise WorkerError(f"the expert prefetch worker died before expert {expert} of "
                              f"{layer_name} was copied: "
                              f"{type(cause).__name__ if cause else 'exited'}: {cause}") from cause
        self._cond.wait(WAIT_POLL_S)

    def _raise_failures(self, layer_name: str) -> None:
        """A prefetch copy that failed, raised in the compute thread (lock held)."""
        if self._worker_error is not None:
            raise WorkerError(f"the expert prefetch worker died ({layer_name} was computing): "
                              f"{type(self._worker_error).__name__}: {self._worker_error}"
                              ) from self._worker_error
        if self._failed is not None:
            job, error = self._failed, self._error
            self._failed = self._error = None
            self._drop(self.layers[job.layer], job.slot)
            raise WorkerError(f"expert {job.expert} of {job.layer} (prefetched while "
                              f"{layer_name} was computing): {error}") from error

    def _fold(self) -> None:
        """Move the worker's counts into the stats (compute thread, lock held)."""
        done, stats = self._done, self._stats()
        stats.expert_prefetches += done.experts
        stats.copied_bytes += done.nbytes
        stats.expert_evictions += done.evictions
        self._done = WorkerCounts()

    def _drop(self, layer: _Layer, slot: ExpertSlot) -> None:
        if slot.holder is not None and layer.where.get(slot.holder) is slot:
            del layer.where[slot.holder]
        slot.holder, slot.held, slot.loading, slot.prefetched = None, [], False, False
        slot.in_use = False

    def _copy_in(self, layer: _Layer, slot: ExpertSlot, expert: int):
        """Copy ``expert``'s matrices into ``slot`` now: (views, bytes copied)."""
        name = layer.names[expert][0]
        try:
            copies = self._copies(layer, slot, expert)
            for copy in copies:
                # store[name]: host RAM, or (under --host-budget) a direct read from the
                # shards; the disk ring reads ahead in cyclic order, which experts lack
                name = copy.name
                self.copier.run(copy)
        except Exception as exc:
            raise WorkerError(f"fetching expert weight {name!r} to {self.arena.device} "
                              f"failed: {type(exc).__name__}: {exc}") from exc
        return [c.target for c in copies], sum(c.source.nbytes for c in copies)

    def _copies(self, layer: _Layer, slot: ExpertSlot, expert: int) -> List[CopyJob]:
        offset, copies = slot.offset, []
        for name in layer.names[expert]:
            weight = self.store.describe(name)
            target = carve(self.arena, offset, weight, self.cache_format, self.dtype)
            copies.append(CopyJob(name, self.store[name], target, slot.free_event,
                                  slot.ready_event))
            offset += aligned(held_nbytes(weight, self.cache_format, self.dtype))
        return copies

    # ----- worker side -------------------------------------------------------------
    def next_job(self) -> Optional[ExpertJob]:
        """Block until a queued guess needs a copy and a slot is free; None when closed."""
        with self._cond:
            while not self._closed:
                job = self._pick_job()
                if job is not None:
                    return job
                self._cond.wait()
        return None

    def _pick_job(self) -> Optional[ExpertJob]:
        for layer_name in list(self._requests):
            layer = self.layers[layer_name]
            wanted, keep = self._requests[layer_name]  # keep: no guess evicts another
            while wanted:
                expert = wanted.pop(0)
                if expert in layer.where or self._on_disk(layer, expert):
                    continue  # there already, or read on demand (the disk ring is cyclic)
                free = [s for s in layer.slots if not s.in_use and not s.loading
                        and s.holder not in keep]
                slot = choose_prefetch_victim(self.plan.policy, free, layer.uses, expert)
                if slot is None:
                    break
                if slot.holder is not None:
                    self._done.evictions += 1
                    del layer.where[slot.holder]
                slot.holder, slot.held, slot.loading, slot.prefetched = expert, [], True, True
                layer.where[expert] = slot
                job = ExpertJob(layer_name, expert, slot, self._copies(layer, slot, expert))
                slot.held = [c.target for c in job.copies]
                return job
            del self._requests[layer_name]
        return None

    def _on_disk(self, layer: _Layer, expert: int) -> bool:
        return any(self.store.disk_nbytes(n) for n in layer.names[expert])

    def finish_job(self, job: ExpertJob, error: Optional[BaseException]) -> None:
        with self._cond:
            job.slot.loading = False
            if error is None:
                self._done.experts += 1
                self._done.nbytes += sum(c.source.nbytes for c in job.copies)
            elif self._failed is None:
                self._failed, self._error = job, error
            self._cond.notify_all()

    def worker_died(self, error: BaseException) -> None:
        with self._cond:
            self._worker_error = error
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._worker.is_alive():
            self._worker.join(JOIN_TIMEOUT_S)
            if self._worker.is_alive():
                raise WorkerError("the expert prefetch worker did not stop within "
                                  f"{JOIN_TIMEOUT_S:.0f} s of close()")
        with self._cond:
            self._fold()  # the copies finished after the last layer began
