"""The background worker that copies upcoming weights from host to device.

It asks its scheduler (the device cache) for the next job, copies outside any
lock and reports back. On CUDA the copies are non-blocking, from pinned memory, on
a dedicated stream: a slot is overwritten only after the stream has waited for the
event recorded when the last kernel reading that slot was queued, and the compute
stream waits on the copy's event before reading. Nothing sleeps or spins: the
worker blocks on the scheduler's condition variable. Any exception is handed to
the scheduler, which raises it in the caller that needs the weight.
"""

from __future__ import annotations

import logging
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
from torch.profiler import record_function

from ..kernels import cpu_int4
from ..quant.quantize import QuantizedWeight, dequantize_weight
from .ranges import FETCH

logger = logging.getLogger(__name__)


@dataclass
class CopyJob:
    """Copy ``source`` (host) into ``target`` (device views of a slot)."""

    name: str
    source: object  # QuantizedWeight in host RAM, or a DiskSource to borrow it from
    target: object  # QuantizedWeight of views, or a dense tensor (dequantized form)
    wait_event: Optional[object] = None  # CUDA event: last reader of the slot is queued
    ready_event: Optional[object] = None  # CUDA event recorded after the copy


class Copier:
    """Host-to-device copies: a side stream and events on CUDA, plain memcpy on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def new_event(self):
        return torch.cuda.Event() if self.stream is not None else None

    def run(self, job: CopyJob) -> None:
        # A weight read from disk is borrowed from the disk reader's ring of host buffers.
        with _borrow(job.source) as source:
            _check_scales(job.name, source)
            if self.stream is None:
                _copy(source, job.target, self.device)
                return
            with torch.cuda.stream(self.stream):
                if job.wait_event is not None:
                    self.stream.wait_event(job.wait_event)
                _copy(source, job.target, self.device)
                job.ready_event.record(self.stream)
            if source is not job.source:  # the ring buffer is refilled once it is returned
                job.ready_event.synchronize()


def _borrow(source):
    borrow = getattr(source, "borrow", None)
    return borrow() if borrow is not None else nullcontext(source)


def _check_scales(name: str, weight: QuantizedWeight) -> None:
    # Scales are 1/group_size of the data: checking them is cheap and catches the
    # corruption that would otherwise turn into silent NaN logits.
    if not torch.isfinite(weight.scale_values()).all():
        raise ValueError(f"weight {name!r} has non-finite scales in host memory (corrupt data)")


def _copy(source: QuantizedWeight, target, device: torch.device) -> None:
    if isinstance(target, torch.Tensor):  # dequantized form
        if device.type == "cuda":
            staged = QuantizedWeight.from_parts(
                {part: t.to(device, non_blocking=True) for part, t in source.components().items()},
                source.spec, source.out_features, source.in_features)
            target.copy_(dequantize_weight(staged, target.dtype))
        else:
            target.copy_(dequantize_weight(source, target.dtype))
        return
    for part, tensor in source.components().items():
        getattr(target, part).copy_(tensor, non_blocking=True)
    if cpu_int4.is_prepacked(target):  # CPU only: the kernel's form, from the copied parts
        cpu_int4.prepack_into(target, target)


class PrefetchWorker:
    """One thread: take a job from the scheduler, copy, report, repeat until closed."""

    def __init__(self, scheduler, copier: Copier):
        self.scheduler = scheduler
        self.copier = copier
        self.fatal: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._loop, name="offload-prefetch", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)

    def _loop(self) -> None:
        try:
            while True:
                job = self.scheduler.next_job()
                if job is None:
                    return
                error = None
                try:
                    # Always recorded: the profiler-on check is per thread and this thread
                    # never turns it on, and a copy of megabytes dwarfs the range's cost.
                    with record_function(FETCH):
                        self.copier.run(job)
                except Exception as exc:  # handed to the caller that needs this weight
                    error = exc
                self.scheduler.finish_job(job, error)
        except BaseException as exc:
            logger.exception("prefetch worker died")
            self.fatal = exc
            self.scheduler.worker_died(exc)
