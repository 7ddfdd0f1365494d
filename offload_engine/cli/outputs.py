"""Output paths given on the command line, checked before the work whose result they hold.

A run, a calibration or a bench sweep takes seconds to hours; finding only at the end that
its --stats-json, -o or --out-dir cannot be written loses the result. Each path is checked
first: not a directory where a file goes (or the reverse), no file in the way, and the
nearest existing directory writable (a probe file is made and removed there).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import ConfigError


def check_output(path: Path, flag: str, directory: bool = False) -> None:
    """ConfigError naming ``flag`` when ``path`` (a file, or a directory with
    ``directory``) cannot be written; creates nothing that stays."""
    path = Path(path).absolute()
    if directory and path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path}: exists and is not a directory; give a directory")
    if not directory and path.is_dir():
        raise ConfigError(f"{flag} {path}: is a directory; give a file path")
    place = path if directory and path.is_dir() else path.parent
    while not place.exists() and place != place.parent:
        place = place.parent
    if not place.is_dir():
        raise ConfigError(f"{flag} {path}: {place} is a file, so nothing can be created "
                          "under it; give another path")
    try:
        handle, probe = tempfile.mkstemp(prefix=".offload-engine-probe-", dir=place)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot write in {place} ({exc.strerror or exc}); "
                          "give a writable path") from None
    if path.is_file() and not os.access(path, os.W_OK):
        raise ConfigError(f"{flag} {path}: the file is read-only; give a writable path")
