"""Host store: every quantized weight of a checkpoint, held in (pinned) host memory.

A read-only Mapping from module name (``model.layers.0.mlp.up_proj``) to its
:class:`QuantizedWeight`. Dense tensors (embeddings, norms, biases) are not kept
here: they are handed once to the model loader by :func:`read_dense_tensors`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Dict, Iterable, Iterator, Optional, Tuple

import psutil
import torch
from tqdm.auto import tqdm

from ..checkpoint.checksums import TensorVerifier
from ..checkpoint.format import (
    Component,
    Manifest,
    load_component,
    read_manifest,
    verify_directory,
)
from ..checkpoint.stfile import DTYPES
from ..errors import FormatError, ResourceError
from ..quant.quantize import QuantizedWeight
from ..units import format_bytes
from .pinned import HostArena, arena_nbytes

logger = logging.getLogger(__name__)
WEIGHT_SUFFIX = ".weight"
RAM_HEADROOM_BYTES = 512 * 1024**2  # leave this much for Python, activations, the OS


def module_name(tensor_name: str) -> str:
    """``model.layers.0.mlp.up_proj.weight`` -> ``model.layers.0.mlp.up_proj``."""
    if tensor_name.endswith(WEIGHT_SUFFIX):
        return tensor_name[: -len(WEIGHT_SUFFIX)]
    return tensor_name


def check_host_ram(needed_bytes: int, directory: Path) -> None:
    available = psutil.virtual_memory().available
    if needed_bytes + RAM_HEADROOM_BYTES > available:
        raise ResourceError(
            f"{directory}: loading needs {format_bytes(needed_bytes)} of host RAM plus "
            f"{format_bytes(RAM_HEADROOM_BYTES)} headroom, but only {format_bytes(available)} "
            "is available; set --host-budget to read part of the weights from disk, close "
            "other programs, or use a smaller model or scheme"
        )


def check_finite(directory: Path, name: str, comp: Component, tensor: torch.Tensor) -> None:
    """FormatError naming shard and tensor when a float component (a dense tensor, scales,
    zero points) holds NaN or Inf: a checksum only proves the bytes are those written."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise FormatError(f"{Path(directory) / comp.shard}: tensor {name!r} ({comp.key!r}) has "
                          f"{bad} non-finite values (NaN or Inf): the checkpoint is corrupt; "
                          "re-convert the model from a good source")


def check_float_components(directory: Path, manifest: Manifest) -> None:
    """Read every float component (dense tensors, scales, zero points) and refuse NaN or
    Inf, as loading does; for ``inspect``."""
    headers: dict = {}
    for name, entry in manifest.tensors.items():
        for comp in entry.components.values():
            if DTYPES[comp.dtype].is_floating_point:
                check_finite(directory, name, comp, load_component(directory, comp, headers))


class HostStore(Mapping):
    """Read-only mapping: module name -> QuantizedWeight in host memory."""

    def __init__(self, weights: Dict[str, QuantizedWeight], pinned: bool,
                 arena: Optional[HostArena] = None):
        self._weights = weights
        self.pinned = pinned
        self._arena = arena  # the memory the weights are views of (unpinned on close)

    @classmethod
    def load(cls, directory: Path, manifest: Manifest | None = None, pin: bool = False,
             progress: bool = True) -> HostStore:
        directory = Path(directory)
        manifest = manifest or verify_directory(directory)
        quantized = {n: e for n, e in manifest.tensors.items() if e.quantized}
        check_host_ram(sum(e.nbytes for e in manifest.tensors.values()), directory)
        shapes = component_shapes(entry.components for entry in quantized.values())
        arena = HostArena(arena_nbytes(shapes), pin)
        headers: dict = {}
        weights = {}
        verifier = TensorVerifier(directory, manifest)
        bar = tqdm(quantized.items(), desc="loading weights", unit="tensor", disable=not progress)
        for name, entry in bar:
            parts = {}
            for part, comp in entry.components.items():
                tensor = load_component(directory, comp, headers)
                verifier.check(name, comp, tensor)
                check_finite(directory, name, comp, tensor)
                parts[part] = arena.take(tuple(comp.shape), tensor.dtype).copy_(tensor)
            weights[module_name(name)] = QuantizedWeight.from_parts(
                parts, manifest.spec_of(entry), out_features=entry.shape[0],
                in_features=entry.shape[1])
        return cls(weights, pinned=arena.pinned, arena=arena)

    def __getitem__(self, name: str) -> QuantizedWeight:
        return self._weights[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._weights)

    def __len__(self) -> int:
        return len(self._weights)

    @property
    def nbytes(self) -> int:
        return sum(weight.nbytes for weight in self._weights.values())

    # The hooks the device cache uses, so that a store with a disk tier
    # (runtime/tiered_store.py) can stand in for this one.
    def describe(self, name: str) -> QuantizedWeight:
        """The weight's shapes and dtypes (its data may be on disk)."""
        return self._weights[name]

    def source(self, name: str):
        """What a copy reads: the weight, or a handle to borrow it from the disk reader."""
        return self._weights[name]

    def disk_nbytes(self, name: str) -> int:
        """Bytes read from disk each time ``name`` is copied (0: it is in RAM)."""
        return 0

    def close(self) -> None:
        """Unpin the weights' memory (a subclass also stops its background reading)."""
        if self._arena is not None:
            self._arena.release()


def component_shapes(weights: Iterable[Dict[str, Component]]
                     ) -> Iterator[Tuple[tuple, torch.dtype]]:
    """(shape, dtype) of every stored component of ``weights`` (each a manifest entry's
    components), for sizing a HostArena."""
    for components in weights:
        for comp in components.values():
            yield tuple(comp.shape), DTYPES[comp.dtype]


def read_dense_tensors(directory: Path, manifest: Manifest | None = None
                       ) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor that stays dense (embeddings, norms, biases)."""
    directory = Path(directory)
    manifest = manifest or read_manifest(directory)
    headers: dict = {}
    verifier = TensorVerifier(directory, manifest, note_missing=False)
    for name, entry in manifest.tensors.items():
        if not entry.quantized:
            comp = entry.components["dense"]
            tensor = load_component(directory, comp, headers)
            verifier.check(name, comp, tensor)
            check_finite(directory, name, comp, tensor)
            yield name, tensor
