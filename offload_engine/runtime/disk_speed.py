"""How fast this machine reads a model's shard files from disk (``calibrate``'s disk figure).

The disk tier (``--host-budget``) reads weights with ``os.preadv`` into preallocated
buffers and drops the pages it read from the page cache; this measures the same path on a
scratch file written in the directory the user names (the disk their models live on),
after dropping that file from the page cache, so the figure is the disk's and not RAM's.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

from ..errors import ConfigError

logger = logging.getLogger(__name__)
CHUNK_BYTES = 16 << 20  # one preadv per chunk, as the disk ring reads a weight
FILL_BYTES = 1 << 20  # random bytes repeated: a file of zeros could be stored sparse


def _write_scratch(directory: Path, nbytes: int) -> Path:
    handle, name = tempfile.mkstemp(prefix=".offload-engine-disk-", dir=directory)
    try:
        block = os.urandom(FILL_BYTES)
        for _ in range(0, nbytes, FILL_BYTES):
            os.write(handle, block)
        os.fsync(handle)  # clean pages can be dropped; dirty ones could not
    finally:
        os.close(handle)
    return Path(name)


def _read_once(path: Path, buffer: bytearray) -> tuple:
    """(bytes, seconds) of one cold read of the whole file into ``buffer``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)
        view, offset = memoryview(buffer), 0
        started = time.perf_counter()
        while offset < size:
            got = os.preadv(fd, [view[: min(CHUNK_BYTES, size - offset)]], offset)
            if got <= 0:
                break
            offset += got
        return offset, time.perf_counter() - started
    finally:
        os.close(fd)


def disk_read_bandwidth(directory, nbytes: int, repeats: int = 3) -> float:
    """Bytes/s of cold sequential reads of a scratch file of ``nbytes`` in ``directory``.

    The best of ``repeats`` reads, each after dropping the file from the page cache. Where
    the OS cannot drop it (no posix_fadvise), the figure is a cached read and says more
    about RAM than the disk; the log says so.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"--disk-dir {directory}: no such directory; give the directory "
                          "your models live on")
    if not hasattr(os, "posix_fadvise"):
        logger.warning("this OS cannot drop files from the page cache: the disk figure is a "
                       "cached read")
    try:
        path = _write_scratch(directory, nbytes)
    except OSError as exc:
        raise ConfigError(f"--disk-dir {directory}: cannot write a {nbytes >> 20} MiB scratch "
                          f"file there ({exc}); pick a writable directory on the same disk") \
            from exc
    try:
        buffer = bytearray(min(CHUNK_BYTES, nbytes))
        best = min((_read_once(path, buffer) for _ in range(repeats)), key=lambda r: r[1])
    finally:
        path.unlink(missing_ok=True)
    read, seconds = best
    return read / seconds if seconds > 0 else float("inf")
