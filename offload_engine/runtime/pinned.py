"""Host memory for weights: one buffer of exactly the bytes held, page-locked in place on CUDA.

torch's pinned allocator (``pin_memory()``, ``torch.empty(..., pin_memory=True)``) rounds
every allocation up to the next power of two before it calls ``cudaHostAlloc`` (ATen's
CachingHostAllocator: ``PowerOf2Ceil(size)``). A 70.8 MB MLP matrix of the 32B model so
pins 128 MiB, and the 16.5 GB of weights would pin about 30 GB: more than many hosts
that run this model have. Here the weights share one ordinary buffer of the exact size,
page-locked once with ``cudaHostRegister``. Non-blocking copies from it are DMA
transfers like those from any pinned memory: torch's copy asks the CUDA runtime whether
a pointer is pinned, and its host allocator ignores memory it did not allocate.

Where page-locking fails (an old driver, a locked-memory limit), the buffer stays
ordinary memory: copies still work, synchronously, and a warning says so.
"""

from __future__ import annotations

import logging
import weakref
from typing import Iterable, Tuple

import torch

from ..units import format_bytes

logger = logging.getLogger(__name__)
ALIGN_BYTES = 512  # every tensor starts here: aligned for any dtype and for DMA
PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context, not just this one


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES


def arena_nbytes(shapes: Iterable[Tuple[tuple, torch.dtype]]) -> int:
    """Bytes an arena needs to hold tensors of these (shape, dtype), each aligned."""
    total = 0
    for shape, dtype in shapes:
        numel = 1
        for dim in shape:
            numel *= dim
        total += aligned(numel * dtype.itemsize)
    return total


class HostArena:
    """A host buffer handed out in aligned pieces, page-locked on CUDA when ``pin``."""

    def __init__(self, nbytes: int, pin: bool):
        self.buffer = torch.empty(nbytes, dtype=torch.uint8)
        self._used = 0
        self.pinned = bool(pin and nbytes) and _register(self.buffer)
        self._release = weakref.finalize(self, _unregister, self.buffer) if self.pinned \
            else None
        if self._release is not None:
            self._release.atexit = False  # the driver unpins at exit; CUDA may be gone by then

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def take(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` and ``dtype`` carved from the buffer."""
        numel = 1
        for dim in shape:
            numel *= dim
        nbytes = numel * dtype.itemsize
        if self._used + nbytes > self.nbytes:
            raise MemoryError(f"host arena of {self.nbytes} bytes is full: {self._used} used, "
                              f"{nbytes} more asked (an arena is sized with arena_nbytes)")
        piece = self.buffer[self._used:self._used + nbytes]
        self._used += aligned(nbytes)
        return piece.view(dtype).view(shape)

    def release(self) -> None:
        """Unpin now (pending copies are waited for); the memory lives while views do."""
        if self._release is not None:
            self._release()


def _register(buffer: torch.Tensor) -> bool:
    cudart = torch.cuda.cudart()
    error = cudart.cudaHostRegister(buffer.data_ptr(), buffer.numel(), PORTABLE)
    if error == cudart.cudaError.success:
        return True
    logger.warning("could not page-lock %s of host memory for the weights (%s): host->device "
                   "copies will be synchronous and slower", format_bytes(buffer.numel()),
                   cudart.cudaGetErrorString(error))
    return False


def _unregister(buffer: torch.Tensor) -> None:
    # Copies from the buffer may still be queued on a stream: unpinning under them is
    # undefined, so wait for the device first.
    torch.cuda.synchronize()
    cudart = torch.cuda.cudart()
    error = cudart.cudaHostUnregister(buffer.data_ptr())
    if error != cudart.cudaError.success:
        logger.warning("unpinning the weights' host memory failed: %s",
                       cudart.cudaGetErrorString(error))
