"""Direct reads of stored weights from the shard files, with the files checked on each read.

No mmap: a mapped shard's pages count in the process's resident set as they are
touched, which is the RSS growth a host budget exists to prevent. Each component is
read with ``os.preadv`` (one system call, no file position shared between threads)
straight into a preallocated buffer. With ``drop_cache`` the pages just read are
dropped from the page cache (``posix_fadvise DONTNEED``): a user who bounded host RAM
does not want the kernel to fill the rest with shard pages, and a run then measures
the disk, not a warm cache. O_DIRECT is not used: safetensors offsets are not aligned
to the device block size, so it would need a bounce buffer and a second copy.

A shard that disappears, is replaced or shrinks while the model runs is reported by
path before any byte of it is used. Bytes changed in place are caught after the read:
each tensor read is checked against the CRC-32 the manifest records for it (the loader's
check, repeated on every read of the disk tier), and a mismatch names shard and tensor.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Dict

import torch

from ..checkpoint import stfile
from ..checkpoint.checksums import TensorVerifier
from ..checkpoint.format import Component, Manifest
from ..errors import FormatError

ADVISE = hasattr(os, "posix_fadvise")


class ShardFiles:
    """Open shards of one quantized directory; thread-safe positional reads."""

    def __init__(self, directory: Path, manifest: Manifest, drop_cache: bool = False):
        self.directory = Path(directory)
        self.drop_cache = drop_cache and ADVISE
        self._headers: Dict[str, dict] = {}
        self._fds: Dict[str, int] = {}
        self._inodes: Dict[str, int] = {}
        self._lock = threading.Lock()
        self._sizes = dict(manifest.shards)
        self._verifier = TensorVerifier(directory, manifest, note_missing=False)
        self._owners = {(comp.shard, comp.key): name for name, entry in manifest.tensors.items()
                        for comp in entry.components.values()}

    def _fd(self, shard: str) -> int:
        with self._lock:
            fd = self._fds.get(shard)
            if fd is None:
                path = self.directory / shard
                self._headers[shard] = stfile.read_header(path)
                fd = os.open(path, os.O_RDONLY)
                self._fds[shard] = fd
                self._inodes[shard] = os.fstat(fd).st_ino
            return fd

    def info(self, comp: Component) -> stfile.TensorInfo:
        self._fd(comp.shard)
        info = self._headers[comp.shard].get(comp.key)
        if info is None:
            raise FormatError(f"{self.directory / comp.shard}: tensor {comp.key!r} is missing; "
                              "re-convert the model")
        return info

    def read_into(self, comp: Component, out: torch.Tensor, verify: bool = True) -> int:
        """Fill ``out`` (a contiguous CPU tensor of the component's size); bytes read.

        With ``verify`` the bytes are checked against the manifest's CRC-32 (else the
        caller calls :meth:`verify`, e.g. to time it)."""
        fd, info = self._fd(comp.shard), self.info(comp)
        self._check_file(comp.shard, fd, info)
        buffer = memoryview(out.view(torch.uint8).reshape(-1).numpy())
        if len(buffer) != info.nbytes:
            raise FormatError(f"{self.directory / comp.shard}: tensor {comp.key!r} has "
                              f"{info.nbytes} bytes, its buffer {len(buffer)}")
        got = 0
        while got < info.nbytes:  # preadv may return short counts on some filesystems
            count = os.preadv(fd, [buffer[got:]], info.begin + got)
            if count == 0:
                raise FormatError(f"{self.directory / comp.shard}: shard ended inside tensor "
                                  f"{comp.key!r} (it shrank while running); re-convert or "
                                  "restore the file, then reload the model")
            got += count
        if self.drop_cache and info.nbytes:
            os.posix_fadvise(fd, info.begin, info.nbytes, os.POSIX_FADV_DONTNEED)
        if verify:
            self.verify(comp, out)
        return got

    def verify(self, comp: Component, out: torch.Tensor) -> None:
        """FormatError naming shard and tensor when ``out`` differs from the recorded CRC."""
        self._verifier.check(self._owners.get((comp.shard, comp.key), comp.key), comp, out)

    def _check_file(self, shard: str, fd: int, info: stfile.TensorInfo) -> None:
        # An open descriptor still reads a deleted file, so the path is checked as well:
        # a user who removed or replaced a shard expects the engine to notice.
        path = self.directory / shard
        try:
            on_disk = os.stat(path)
        except FileNotFoundError as exc:
            raise FormatError(f"{path}: shard disappeared while the model was running; "
                              "restore it and reload the model") from exc
        if on_disk.st_ino != self._inodes[shard]:
            raise FormatError(f"{path}: shard was replaced while the model was running; "
                              "reload the model")
        size = os.fstat(fd).st_size
        if size < info.end or size != self._sizes.get(shard, size):
            raise FormatError(f"{path}: shard has {size} bytes, manifest says "
                              f"{self._sizes.get(shard)} (it shrank or changed while running); "
                              "restore the file, then reload the model")

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
