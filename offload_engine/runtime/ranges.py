"""Named profiler ranges that cost nothing when no profiler is running.

``record_function`` costs about 7 us per use even with no profiler attached (measured on
CPU, tools/bench.py's overhead test): at the ~22,000 linear calls per second of a 32B
model at 50 tokens/s that alone would be 0.15 s of every second. So the engine marks its
work only while a profiler is on.
"""

from __future__ import annotations

import contextlib

import torch
from torch.profiler import record_function

FETCH = "offload.fetch"  # a host-to-device copy, on the prefetch worker's thread
WAIT = "offload.wait"  # the compute thread waiting for a copy
LINEAR = "offload.linear"  # one cache-backed linear, wait included
RANGE_NAMES = (FETCH, WAIT, LINEAR)
_NO_RANGE = contextlib.nullcontext()
_recording = False  # set while profiling.trace_to (or recording()) is active


@contextlib.contextmanager
def recording():
    """Mark the engine's ranges in the enclosed block (use it around your own profiler)."""
    global _recording
    previous, _recording = _recording, True
    try:
        yield
    finally:
        _recording = previous


def profiled_now() -> bool:
    """Whether the engine's ranges are being recorded (a profiler is on)."""
    return _recording or torch._C._autograd._profiler_enabled()


def profiled(name: str):
    """A record_function range while recording, else a shared no-op context.

    A profiler started on this thread is noticed by itself; one that profiles all
    threads keeps its state globally, where this check cannot see it: hence recording().
    """
    if profiled_now():
        return record_function(name)
    return _NO_RANGE
