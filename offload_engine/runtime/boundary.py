"""Running decoder layer parts on the CPU: host weights, the boundary, and its counters.

:func:`planning.placement.place_parts` decides which parts (a layer's attention or MLP)
run on the CPU. Here:

- :class:`HostWeights` hands the linears of those parts their weight straight from the
  host store, prepacked once at load for the CPU kernel (no device cache, no copy); with
  ``--placement experts-cpu`` it holds a mixture-of-experts model's cold experts instead,
  which runtime/experts.py computes with one crossing in and one out per experts layer;
- :class:`PlacedPart` wraps the part's module: the activations cross to the CPU once on
  the way in and once on the way out (the residual stream stays on the device), and the
  attention's KV cache is created where its keys are computed: in host RAM;
- :class:`BoundaryStats` counts what it costs: weight bytes the CPU read, seconds spent
  in CPU parts, activation crossings.

On a CPU-only machine both sides are the CPU: nothing moves, but the placement, the
crossings and the accounting run exactly as they would beside a GPU.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List

import torch
from torch import nn

from ..errors import ConfigError
from ..kernels import cpu_int4
from ..kernels.gateway import prepare_cpu_weight
from .cache.device_cache import Handle

CPU = torch.device("cpu")


@dataclass
class BoundaryStats:
    """Counters since load (or the last reset), read by generate's per-call stats."""

    cpu_bytes: int = 0  # weight bytes read by CPU-computed linears
    cpu_seconds: float = 0.0  # wall time inside CPU-placed parts
    crossings: int = 0  # activation transfers between the device and the CPU side
    cpu_part_calls: int = 0  # CPU-placed part forwards
    passes: int = 0  # uses of the first CPU-placed weight (forward passes, when the device
    # cache has no weight of its own to count them)

    def as_dict(self) -> dict:
        return asdict(self)


class HostWeights:
    """The weights of CPU-placed parts, read from host RAM where they lie.

    Same acquire/release interface as the device cache, so OffloadedLinear is unchanged.
    """

    def __init__(self, store, names: Iterable[str], stats: BoundaryStats,
                 counts_passes: bool = True):
        """``counts_passes``: the first name is used once per forward pass (False for
        the cold experts of --placement experts-cpu, used as the routers pick them)."""
        self.stats = stats
        self._handles: Dict[str, Handle] = {}
        names = list(names)
        self._first = names[0] if names and counts_passes else None
        for name in names:
            if store.disk_nbytes(name):
                raise ConfigError(f"weight {name!r} is read from disk (--host-budget) but its "
                                  "part is placed on the CPU: raise --host-budget or use "
                                  "--placement stream")
            weight = prepare_cpu_weight(store[name])
            self._handles[name] = Handle(name, weight, None)
        self._read = {name: _read_bytes(h.weight) for name, h in self._handles.items()}

    @property
    def prepacked_bytes(self) -> int:
        """Host bytes of the CPU kernel's form, on top of the stored weights."""
        return sum(getattr(h.weight, "prepacked_nbytes", 0) for h in self._handles.values())

    @property
    def weight_bytes(self) -> int:
        """Weight bytes the CPU reads per forward pass."""
        return sum(self._read.values())

    def __len__(self) -> int:
        return len(self._handles)

    def acquire(self, name: str) -> Handle:
        self.stats.cpu_bytes += self._read[name]  # written by the compute thread only
        if name == self._first:
            self.stats.passes += 1
        return self._handles[name]

    def release(self, handle: Handle) -> None:
        return None


def _read_bytes(weight) -> int:
    """What a CPU linear reads: the prepacked form if it has one, else the stored parts."""
    if cpu_int4.is_prepacked(weight):
        return weight.prepacked_nbytes
    return weight.nbytes


class PlacedPart(nn.Module):
    """A decoder layer part computed on the CPU; tensors cross in and out once."""

    def __init__(self, inner: nn.Module, home: torch.device, stats: BoundaryStats):
        super().__init__()
        self.inner = inner.to(CPU)  # its dense parameters (biases, q/k norms) live on the CPU
        self.home = home  # where the residual stream lives
        self.stats = stats

    def forward(self, *args, **kwargs):
        self.stats.crossings += 1
        self.stats.cpu_part_calls += 1
        started = time.perf_counter()
        args, kwargs = _to(args, CPU), _to(kwargs, CPU)
        out = self.inner(*args, **kwargs)
        out = _to(out, self.home)
        self.stats.crossings += 1
        self.stats.cpu_seconds += time.perf_counter() - started
        return out


def _to(value, device: torch.device):
    """Tensors in nested tuples/lists/dicts moved to ``device``; anything else as is (the
    KV cache object stays shared: each layer's keys live where they were computed)."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True) if value.device != device else value
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def wrap_parts(model: nn.Module, modules: Iterable[str], home: torch.device,
               stats: BoundaryStats) -> List[PlacedPart]:
    """Replace each named part module (``model.layers.3.mlp``) by a PlacedPart around it."""
    placed = []
    for path in modules:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        placed.append(PlacedPart(getattr(parent, child), home, stats))
        setattr(parent, child, placed[-1])
    return placed
