"""torch.profiler around generation, written as a Chrome trace (Perfetto, TensorBoard).

The engine marks its work with named ranges: ``offload.fetch`` (a host-to-device
copy on the prefetch worker), ``offload.wait`` (compute waiting for a copy) and
``offload.linear`` (one cache-backed linear, wait included).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile

from ..errors import ResourceError
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
def trace_to(path: Optional[Path]):
    """Profile the enclosed block into ``path`` (a no-op when path is None)."""
    if path is None:
        yield None
        return
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, record_shapes=False,
                 experimental_config=_all_threads_config()) as prof, recording():
        yield prof
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    prof.export_chrome_trace(str(path))
    if not path.is_file():  # torch logs a failed write and returns
        raise ResourceError(f"{path}: the profiler trace could not be written; check the "
                            "path and the free disk space")
    logger.info("wrote profiler trace %s", path)
