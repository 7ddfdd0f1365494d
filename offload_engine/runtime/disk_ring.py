"""The disk reader: one thread reading weights from the shards, ahead of the copies.

Weights that do not fit the host budget are read every forward pass, in execution
order, into a small ring of preallocated host buffers (pinned on CUDA, so the copy
to the device is asynchronous). The prefetch worker :meth:`DiskRing.take` s a weight,
copies it to the device and :meth:`DiskRing.give_back` s the buffer; the reader
refills it with the next weight in the cycle. When the worker asks for a weight the
reader did not expect (the first pass, an interrupted pass, the lru policy), the
reader restarts the cycle from that weight. Read errors are handed to the worker
that takes the weight (it raises them in the caller, naming the file); the reader
itself never dies silently, and nothing sleeps or spins.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch

from ..checkpoint.format import Component
from ..errors import WorkerError
from ..quant.quantize import QuantizedWeight
from .cache.arena import carve
from .pinned import HostArena, aligned
from .shard_io import ShardFiles

logger = logging.getLogger(__name__)
WAIT_POLL_S = 0.05  # how often a waiting taker re-checks that the reader is alive
JOIN_TIMEOUT_S = 10.0


@dataclass
class DiskStats:
    """Counters of the disk tier since it was built (or last reset)."""

    bytes_read: int = 0  # every byte read from the shards, read-ahead included
    read_seconds: float = 0.0  # time the reader spent in reads
    reads: int = 0
    wasted_reads: int = 0  # read ahead but dropped: the worker asked for another weight
    stall_seconds: float = 0.0  # the prefetch worker waiting for the reader
    verify_seconds: float = 0.0  # the reader checking each read's CRC-32 (not in read_seconds)

    @property
    def read_bytes_per_s(self) -> float:
        return self.bytes_read / self.read_seconds if self.read_seconds else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "read_bytes_per_s": self.read_bytes_per_s}


class RingBuffer:
    """One host buffer of the ring and the weight it holds."""

    def __init__(self, data: torch.Tensor):
        self.data = data  # uint8, a piece of the ring's HostArena
        self.name: Optional[str] = None
        self.weight: Optional[QuantizedWeight] = None
        self.reading = False
        self.taken = False
        self.stale = False  # dropped while its read was in flight: free it when done
        self.error: Optional[BaseException] = None


class DiskRing:
    """Reads ``order`` cyclically into ``slots`` host buffers; the worker takes them."""

    def __init__(self, files: ShardFiles, layouts: Dict[str, QuantizedWeight],
                 components: Dict[str, Dict[str, Component]], order: List[str],
                 slots: int, slot_bytes: int, pin: bool):
        self.files, self.layouts, self.components = files, layouts, components
        self.order = list(order)
        self._position = {name: i for i, name in enumerate(self.order)}
        count = slots if order else 0
        self.arena = HostArena(count * aligned(slot_bytes), pin)
        self.buffers = [RingBuffer(self.arena.take((slot_bytes,), torch.uint8))
                        for _ in range(count)]
        self.stats = DiskStats()
        self._cond = threading.Condition()
        self._next = 0  # position in ``order`` of the next weight to read
        self._closed = False
        self._fatal: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._loop, name="offload-disk-reader",
                                        daemon=True)
        if self.buffers:
            self._thread.start()

    # ----- the prefetch worker's side ------------------------------------------------
    def take(self, name: str) -> QuantizedWeight:
        """Block until ``name`` is read into a buffer; raise the read's error if it failed."""
        with self._cond:
            buffer = self._find(name)
            if buffer is None:
                self._restart_at(name)
            started, waited = time.perf_counter(), False
            while True:
                self._raise_if_stopped(name)
                buffer = self._find(name)
                if buffer is not None and not buffer.reading:
                    break
                waited = True
                self._cond.wait(WAIT_POLL_S)
            if waited:
                self.stats.stall_seconds += time.perf_counter() - started
            if buffer.error is not None:
                error = buffer.error
                self._free(buffer)
                raise error
            buffer.taken = True
            return buffer.weight

    def give_back(self, name: str) -> None:
        """The copy out of ``name``'s buffer is complete: the reader may reuse it."""
        with self._cond:
            buffer = self._find(name)
            if buffer is not None:
                self._free(buffer)

    def _find(self, name: str) -> Optional[RingBuffer]:
        for buffer in self.buffers:
            if buffer.name == name and not buffer.stale:
                return buffer
        return None

    def _restart_at(self, name: str) -> None:
        """The worker wants a weight out of the expected cycle: read from there on."""
        if name not in self._position:
            raise KeyError(f"weight {name!r} is not read from disk")
        for buffer in self.buffers:
            if buffer.name is not None and not buffer.taken:
                if buffer.reading:
                    buffer.stale = True
                else:
                    self.stats.wasted_reads += 1
                    self._free(buffer)
        self._next = self._position[name]
        self._cond.notify_all()

    def _free(self, buffer: RingBuffer) -> None:
        buffer.name, buffer.weight, buffer.error = None, None, None
        buffer.taken = buffer.stale = buffer.reading = False
        self._cond.notify_all()

    def _raise_if_stopped(self, name: str) -> None:
        if self._closed:
            raise WorkerError(f"weight {name!r} requested after the disk reader was closed")
        if self._fatal is not None or not self._thread.is_alive():
            cause = self._fatal
            raise WorkerError(f"the disk reader died before weight {name!r} was read: "
                              f"{type(cause).__name__ if cause else 'exited'}: {cause}"
                              ) from cause

    # ----- the reader thread ------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                job = self._next_read()
                if job is None:
                    return
                buffer, name = job
                error, started, checked = None, time.perf_counter(), [0.0]
                try:
                    weight, nbytes = self._read(buffer, name, checked)
                except Exception as exc:  # handed to the worker that takes this weight
                    weight, nbytes, error = None, 0, exc
                self._finish(buffer, weight, nbytes, time.perf_counter() - started, error,
                             checked[0])
        except BaseException as exc:
            logger.exception("disk reader died")
            with self._cond:
                self._fatal = exc
                self._cond.notify_all()

    def _next_read(self):
        with self._cond:
            while not self._closed:
                if not self._in_ring(self.order[self._next]):
                    free = [b for b in self.buffers if b.name is None]
                    if free:
                        name = self.order[self._next]
                        free[0].name, free[0].reading = name, True
                        self._advance()
                        return free[0], name
                elif not self._ring_full_ahead():
                    self._advance()
                    continue
                self._cond.wait()
        return None

    def _in_ring(self, name: str) -> bool:
        return self._find(name) is not None

    def _ring_full_ahead(self) -> bool:
        # Every weight of the cycle is in the ring already: nothing more to read ahead.
        return len(self.order) <= len(self.buffers) and all(self._in_ring(n) for n in self.order)

    def _advance(self) -> None:
        self._next = (self._next + 1) % len(self.order)

    def _read(self, buffer: RingBuffer, name: str, checked: List[float]):
        """Read and verify ``name``'s components; ``checked[0]`` gets the CRC seconds."""
        weight = carve(buffer.data, 0, self.layouts[name], "packed", torch.uint8)
        nbytes = 0
        for part, comp in self.components[name].items():
            nbytes += self.files.read_into(comp, getattr(weight, part), verify=False)
            started = time.perf_counter()
            self.files.verify(comp, getattr(weight, part))
            checked[0] += time.perf_counter() - started
        return weight, nbytes

    def _finish(self, buffer, weight, nbytes: int, seconds: float, error,
                verify_seconds: float = 0.0) -> None:
        with self._cond:
            self.stats.bytes_read += nbytes
            self.stats.read_seconds += seconds - verify_seconds
            self.stats.verify_seconds += verify_seconds
            self.stats.reads += 1
            if buffer.stale:
                self.stats.wasted_reads += 1
                self._free(buffer)
                return
            buffer.weight, buffer.error, buffer.reading = weight, error, False
            self._cond.notify_all()

    # ----- lifecycle ----------------------------------------------------------------------
    def reset_stats(self) -> None:
        with self._cond:
            self.stats = DiskStats()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(JOIN_TIMEOUT_S)
            if self._thread.is_alive():
                raise WorkerError(f"the disk reader did not stop within {JOIN_TIMEOUT_S:.0f} s "
                                  "of close()")
        self.buffers = []
        self.arena.release()


class DiskSource:
    """What a copy job holds for a weight read from disk: borrowed from the ring."""

    def __init__(self, ring: DiskRing, name: str, nbytes: int):
        self.ring, self.name, self.nbytes = ring, name, nbytes

    def borrow(self):
        return _Borrowed(self)


class _Borrowed:
    def __init__(self, source: DiskSource):
        self.source = source

    def __enter__(self) -> QuantizedWeight:
        return self.source.ring.take(self.source.name)

    def __exit__(self, *exc_info) -> None:
        self.source.ring.give_back(self.source.name)
