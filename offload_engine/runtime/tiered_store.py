"""A host store with a disk tier: some weights in RAM, the rest read from the shards.

It stands in for :class:`HostStore` when a host budget is set
(:func:`offload_engine.planning.host_policy.plan_host` decides the split). Weights
the device cache streams and the plan keeps in RAM are read once, with direct reads
into (pinned) buffers; weights the plan leaves on disk are borrowed from the
:class:`DiskRing` at each copy. Weights resident on the device are not kept at all:
``store[name]`` reads them from disk into fresh tensors, once, while the cache loads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Dict, Iterator

import psutil
import torch
from tqdm.auto import tqdm

from ..checkpoint.format import Component, Manifest, TensorEntry
from ..checkpoint.stfile import DTYPES
from ..planning.host_policy import HostPlan
from ..planning.sizes import held_nbytes
from ..quant.quantize import QuantizedWeight
from .disk_ring import DiskRing, DiskSource, DiskStats
from .pinned import HostArena, arena_nbytes
from .shard_io import ShardFiles
from .store import (
    RAM_HEADROOM_BYTES,
    HostStore,
    check_finite,
    check_host_ram,
    component_shapes,
    module_name,
)

logger = logging.getLogger(__name__)


def layout_of(entry: TensorEntry, spec) -> QuantizedWeight:
    """A QuantizedWeight of meta tensors shaped like the stored components: no memory."""
    parts = {part: torch.empty(comp.shape, dtype=DTYPES[comp.dtype], device="meta")
             for part, comp in entry.components.items()}
    return QuantizedWeight.from_parts(parts, spec, entry.shape[0], entry.shape[1])


def quantized_layouts(manifest: Manifest) -> Dict[str, QuantizedWeight]:
    """module name -> layout of every quantized weight, from the manifest alone."""
    return {module_name(name): layout_of(entry, manifest.spec_of(entry))
            for name, entry in manifest.tensors.items() if entry.quantized}


class TieredStore(HostStore):
    """Read-only mapping: module name -> QuantizedWeight, from RAM or from the shards."""

    def __init__(self, weights: Dict[str, QuantizedWeight], layouts: Dict[str, QuantizedWeight],
                 components: Dict[str, Dict[str, Component]], files: ShardFiles,
                 ring: DiskRing, plan: HostPlan, pinned: bool, arena: HostArena):
        super().__init__(weights, pinned, arena)
        self.layouts, self.components = layouts, components
        self.files, self.ring, self.plan = files, ring, plan
        on_disk = set(plan.on_disk)
        self._sources = {name: DiskSource(ring, name, layouts[name].nbytes)
                         for name in on_disk}

    @classmethod
    def load_tiered(cls, directory: Path, manifest: Manifest, plan: HostPlan, pin: bool = False,
                    progress: bool = True) -> TieredStore:
        directory = Path(directory)
        layouts = quantized_layouts(manifest)
        components = {module_name(name): entry.components
                      for name, entry in manifest.tensors.items() if entry.quantized}
        dense = sum(e.nbytes for e in manifest.tensors.values() if not e.quantized)
        slot_bytes = max((held_nbytes(layouts[n], "packed", torch.uint8) for n in plan.on_disk),
                         default=0)
        check_host_ram(plan.ram_bytes + plan.ring_slots * slot_bytes + dense, directory)
        files = ShardFiles(directory, manifest, drop_cache=True)
        kept = (components[name] for name in plan.in_ram)
        arena = HostArena(arena_nbytes(component_shapes(kept)), pin)
        weights = {}
        try:
            for name in tqdm(plan.in_ram, desc="loading weights", unit="tensor",
                             disable=not progress or not plan.in_ram):
                weights[name] = _read_new(files, layouts[name], components[name], arena.take)
            # Experts are read when a router picks them, by the compute thread
            # (store[name]), never in the ring's cyclic read-ahead order.
            cyclic = [n for n in plan.on_disk
                      if manifest.tensors[f"{n}.weight"].role != "expert"]
            ring = DiskRing(files, layouts, components, cyclic, plan.ring_slots,
                            slot_bytes, pin)
        except BaseException:
            files.close()
            raise
        logger.info("host tier: %d weights in RAM (%d bytes), %d read from disk every pass "
                    "(%d bytes) through %d buffers of %d bytes", len(plan.in_ram),
                    plan.ram_bytes, len(plan.on_disk), plan.disk_bytes_per_pass,
                    plan.ring_slots, slot_bytes)
        pinned = pin and all(a.pinned for a in (arena, ring.arena) if a.nbytes)
        return cls(weights, layouts, components, files, ring, plan, pinned=pinned, arena=arena)

    def __getitem__(self, name: str) -> QuantizedWeight:
        weight = self._weights.get(name)
        if weight is not None:
            return weight
        # Not kept in RAM: read it now (the device cache does this once per weight it
        # keeps resident; a caller holding the result holds its memory).
        return _read_new(self.files, self.layouts[name], self.components[name], _new_tensor)

    def __iter__(self) -> Iterator[str]:
        return iter(self.layouts)

    def __len__(self) -> int:
        return len(self.layouts)

    @property
    def nbytes(self) -> int:
        """Host RAM the weights take: those kept, plus the disk ring's buffers."""
        return super().nbytes + sum(b.data.numel() for b in self.ring.buffers)

    def describe(self, name: str) -> QuantizedWeight:
        return self._weights.get(name) or self.layouts[name]

    def source(self, name: str):
        return self._weights.get(name) or self._sources[name]

    def disk_nbytes(self, name: str) -> int:
        source = self._sources.get(name)
        return source.nbytes if source is not None else 0

    @property
    def disk_stats(self) -> DiskStats:
        return self.ring.stats

    def close(self) -> None:
        try:
            self.ring.close()
        finally:
            self.files.close()
            super().close()


def _new_tensor(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def _read_new(files: ShardFiles, layout: QuantizedWeight, components: Dict[str, Component],
              allocate: Callable[[tuple, torch.dtype], torch.Tensor]) -> QuantizedWeight:
    """Read one weight's components into tensors from ``allocate`` (an arena's take)."""
    parts = {}
    for part, comp in components.items():
        like = getattr(layout, part)
        parts[part] = allocate(tuple(like.shape), like.dtype)
        files.read_into(comp, parts[part])
        check_finite(files.directory, comp.key, comp, parts[part])
    return QuantizedWeight.from_parts(parts, layout.spec, layout.out_features,
                                      layout.in_features)


def open_store(directory: Path, manifest: Manifest, plan: HostPlan, pin: bool,
               progress: bool) -> HostStore:
    """The store the host plan asks for: all in RAM when unbounded, else with a disk tier."""
    if not plan.bounded:
        return HostStore.load(directory, manifest, pin=pin, progress=progress)
    return TieredStore.load_tiered(directory, manifest, plan, pin=pin, progress=progress)


def default_host_budget(manifest: Manifest, arena_bytes: int, device: torch.device):
    """What fits in available RAM with a margin; None when every weight fits (no disk tier).

    Dense tensors (embeddings, norms) and, on a CPU "device", the arena share the RAM.
    """
    dense = sum(e.nbytes for e in manifest.tensors.values() if not e.quantized)
    quantized = sum(e.nbytes for e in manifest.tensors.values() if e.quantized)
    other = dense + (arena_bytes if device.type == "cpu" else 0)
    room = psutil.virtual_memory().available - RAM_HEADROOM_BYTES - other
    return None if room >= quantized else max(room, 0)
