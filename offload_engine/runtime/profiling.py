"""torch.profiler around generation, written as a Chrome trace (Perfetto, TensorBoard).

The engine marks its work with named ranges: ``offload.fetch`` (a host-to-device
copy on the prefetch worker), ``offload.wait`` (compute waiting for a copy) and
``offload.linear`` (one cache-backed linear, wait included).

The profiler library logs its own start and stop lines from C++ straight to the process's
stdout/stderr, which would land inside the generated text; both are silenced while it
starts and stops. ``steps`` limits the trace to the first N forward passes (a trace of
every op is large: tens of MB for a few tokens of a small model).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile

from ..errors import ConfigError, ResourceError
from .ranges import RANGE_NAMES, recording

__all__ = ["RANGE_NAMES", "trace_to"]

logger = logging.getLogger(__name__)


def _all_threads_config():
    """Ask the profiler to record every thread: the prefetch worker runs on its own."""
    try:
        return torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    except (AttributeError, TypeError):  # older torch: only the calling thread is recorded
        logger.warning("this torch cannot profile all threads; offload.fetch will be missing")
        return None


@contextlib.contextmanager
def _quiet_output():
    """Send what native code writes to file descriptors 1 and 2 to /dev/null meanwhile."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    saved = [os.dup(fd) for fd in (1, 2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            os.dup2(devnull, fd)
        yield
    finally:
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)


class _StopAfter:
    """A forward hook stopping the profiler after ``steps`` forward passes of the model."""

    def __init__(self, prof, steps: int):
        self.prof, self.steps, self.seen, self.stopped = prof, steps, 0, False

    def __call__(self, module, args, output) -> None:
        self.seen += 1
        if self.seen >= self.steps and not self.stopped:
            self.stop()

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            with _quiet_output():
                self.prof.stop()


@contextlib.contextmanager
def trace_to(path: Optional[Path], steps: Optional[int] = None,
             model: Optional[torch.nn.Module] = None):
    """Profile the enclosed block into ``path`` (a no-op when path is None); with ``steps``,
    only the first ``steps`` forward passes of ``model``."""
    if path is None:
        yield None
        return
    if steps is not None and (steps < 1 or model is None):
        raise ConfigError(f"--profile-steps {steps}: give at least 1 (and a model to count)")
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    prof = profile(activities=activities, record_shapes=False,
                   experimental_config=_all_threads_config())
    stopper = _StopAfter(prof, steps or 0)
    handle = model.register_forward_hook(stopper) if steps is not None else None
    with _quiet_output():
        prof.start()
    try:
        with recording():
            yield prof
    finally:
        if handle is not None:
            handle.remove()
        stopper.stop()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    prof.export_chrome_trace(str(path))
    if not path.is_file():  # torch logs a failed write and returns
        raise ResourceError(f"{path}: the profiler trace could not be written; check the "
                            "path and the free disk space")
    logger.info("wrote profiler trace %s", path)
