"""Where a conversion writes: refuse anything that could lose a file, then swap atomically.

``--force`` replaces only a directory that is itself a previous output of ours (it
holds our manifest and nothing else but our shards and side files). DST may never
be SRC, contain SRC, or lie inside SRC. The new output is written beside DST and
exchanged with the old one in one ``renameat2(RENAME_EXCHANGE)`` where Linux offers it,
so an interrupted ``--force`` leaves the old output in place and loadable.

A DST that is a symlink stands for its target: ``--force`` replaces the target and the
link keeps pointing at it; a link to nothing is refused. Whether DST can be written is
found before any work (a probe directory is made and removed where the output will go),
and staging directories left by a killed conversion (``.DST.partial-PID``, its process
gone) are removed on the next run.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, List, Optional

from ..errors import ConversionError, OffloadError
from .format import FORMAT_NAME, MANIFEST_NAME
from .sources import SIDE_FILES

logger = logging.getLogger(__name__)
RENAME_EXCHANGE = 2  # linux/fs.h
AT_FDCWD = -100
FOREIGN_SHOWN = 3  # foreign entries named in the error


def check_destination(src: Path, dst: Path, force: bool) -> None:
    """Raise ConversionError unless writing DST can lose nothing; reads no weights."""
    given, src, dst = Path(dst), Path(src).resolve(), Path(dst).resolve()
    if dst == src or src.is_relative_to(dst):
        raise ConversionError(
            f"{dst}: the output would replace the source {src}; pick a new directory for DST")
    if dst.is_relative_to(src):
        raise ConversionError(
            f"{dst}: the output lies inside the source {src}; write it beside the source")
    check_replaceable(given, force)


def check_replaceable(dst: Path, force: bool, command: str = "quantize",
                      foreign: Optional[Callable[[Path], List[str]]] = None) -> None:
    """Raise ConversionError unless DST is absent, empty, or (with force) a previous output
    of ``command`` (``foreign`` lists what in it is not: default, a quantize output's
    check), and its place can be written. Removes staging directories of killed runs."""
    dst = real_destination(dst)
    remove_stale_staging(dst)
    check_writable(dst)
    if not dst.exists() and not dst.is_symlink():
        return
    if dst.is_symlink() or not dst.is_dir():
        raise ConversionError(f"{dst}: exists and is not a directory; pick another DST")
    if not any(dst.iterdir()):
        return  # an empty directory: nothing to lose
    if not force:
        raise ConversionError(f"{dst} already exists; pass --force to replace it "
                              f"(only a previous output of `{command}` can be replaced)")
    others = (foreign or foreign_entries)(dst)
    if others:
        shown = ", ".join(others[:FOREIGN_SHOWN]) + (" ..." if len(others) > 3 else "")
        raise ConversionError(
            f"{dst}: --force replaces only a previous output of `{command}`, and this "
            f"directory holds other files ({shown}); move them away or pick another DST")


def real_destination(dst: Path) -> Path:
    """DST, or the directory a symlink DST points to; a link to nothing is refused."""
    dst = Path(dst)
    if not dst.is_symlink():
        return dst.absolute()
    target = Path(os.path.realpath(dst))
    if not target.exists():
        raise ConversionError(f"{dst} is a symlink to {os.readlink(dst)}, which does not "
                              "exist; remove the link, or create the directory it points to")
    return target


def check_writable(dst: Path) -> None:
    """Refuse a DST whose directory cannot be written, before any work: make and remove a
    probe directory where the staging directory will go (the nearest existing parent)."""
    parent = Path(dst).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConversionError(f"{dst}: {parent} is a file, so nothing can be created under "
                              "it; pick another DST")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".offload-engine-probe-", dir=parent))
    except OSError as exc:
        raise ConversionError(f"{dst}: cannot write in {parent} ({exc.strerror or exc}); "
                              "pick a writable destination") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_staging(dst: Path) -> None:
    """Remove ``.DST.partial-PID`` entries beside DST whose process is gone (a killed
    conversion's staging directory). Those of live processes are left alone."""
    parent = Path(dst).parent
    if not parent.is_dir():
        return
    pattern = re.compile(re.escape(f".{Path(dst).name}.partial-") + r"(\d+)")
    for entry in parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match is None or int(match.group(1)) == os.getpid() or \
                _pid_alive(int(match.group(1))):
            continue
        logger.info("removing %s, left by a conversion that was killed (process %s)",
                    entry, match.group(1))
        if entry.is_symlink() or not entry.is_dir():
            entry.unlink(missing_ok=True)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def foreign_entries(directory: Path) -> List[str]:
    """Names in DIRECTORY that a conversion did not write (all of them if it has no manifest)."""
    names = sorted(entry.name for entry in directory.iterdir())
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text())
        ours = manifest.get("format") == FORMAT_NAME
        shards = set(manifest.get("shards", {}))
    except (OSError, ValueError, AttributeError):
        ours, shards = False, set()
    if not ours:
        return names
    known = shards | {MANIFEST_NAME} | set(SIDE_FILES)
    return [name for name in names if name not in known or (directory / name).is_dir()]


def make_staging_dir(dst: Path) -> Path:
    """A fresh hidden directory beside DST (same filesystem, so the final rename is atomic)."""
    dst = Path(dst)
    staging = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
    except OSError as exc:
        raise ConversionError(f"{dst}: cannot create the output there ({exc.strerror or exc}); "
                              "pick a writable destination") from exc
    return staging


@contextlib.contextmanager
def staged_output(dst: Path, what: str):
    """A staging directory beside DST to write into; swapped into place when the block ends
    well, removed when it fails. A failure that is not already ours becomes a
    ConversionError saying ``what`` failed and that nothing was written to DST.
    A symlink DST is written through: its target is replaced, the link stays."""
    dst = real_destination(dst)
    staging = make_staging_dir(dst)
    try:
        yield staging
        swap_into_place(staging, dst)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, (OffloadError, KeyboardInterrupt)):
            raise
        raise ConversionError(f"{what} failed: {exc!r}; nothing was written to {dst}") from exc


def swap_into_place(staging: Path, dst: Path) -> None:
    """Move the finished STAGING directory to DST, replacing an old output atomically."""
    try:
        if not dst.exists():
            os.rename(staging, dst)
            return
        if _exchange(staging, dst):
            shutil.rmtree(staging, ignore_errors=True)  # now holds the old output
            return
        _rename_twice(staging, dst)
    except OSError as exc:
        raise ConversionError(f"{dst}: cannot move the new output into place "
                              f"({exc.strerror or exc}); the old output is untouched") from exc


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step (Linux renameat2); False where the system cannot."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second),
                       RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False  # an old kernel or a filesystem without exchange
    raise OSError(code, os.strerror(code), str(second))


def _rename_twice(staging: Path, dst: Path) -> None:
    """Fallback swap: move the old output aside, move the new one in, put back on failure."""
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    os.rename(dst, old)
    try:
        os.rename(staging, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)  # the running process's C library
    except OSError:
        return None
