"""Find a model the way transformers and vLLM do: a local path, a Hugging Face cache folder
(``models--ORG--NAME``), or a model id (``ORG/NAME``) already in the local HF cache.

Nothing is downloaded: an id is looked up with ``huggingface_hub`` in offline mode, and
the error says how to download it when it is not there.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ..errors import SourceError

logger = logging.getLogger(__name__)
# ORG/NAME as the Hub spells repository ids (no leading ./ or /, one slash).
HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CACHE_PREFIX = "models--"


def resolve_model_path(ref) -> Path:
    """The local directory or file REF names: ~ expanded, an HF cache folder turned into
    its snapshot, an HF id looked up in the local cache; a SourceError otherwise."""
    text = str(ref)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir() and path.name.startswith(CACHE_PREFIX):
            return snapshot_of_cache_folder(path)
        return path
    if HF_ID.match(text):
        return _cached_snapshot(text)
    raise SourceError(f"{text}: no such file or directory (nor a Hugging Face id ORG/NAME)")


def snapshot_of_cache_folder(folder: Path) -> Path:
    """The snapshot an HF cache folder ``models--ORG--NAME`` points at: the one refs/main
    names, else the only one there is."""
    snapshots = folder / "snapshots"
    ref = folder / "refs" / "main"
    if ref.is_file():
        chosen = snapshots / ref.read_text().strip()
        if chosen.is_dir():
            return chosen
        raise SourceError(f"{ref} names snapshot {chosen.name}, which is missing from "
                          f"{snapshots}; download the model again")
    found = sorted(p for p in snapshots.iterdir() if p.is_dir()) if snapshots.is_dir() else []
    if len(found) == 1:
        return found[0]
    if not found:
        raise SourceError(f"{folder}: a Hugging Face cache folder without snapshots; "
                          "download the model again")
    raise SourceError(f"{folder}: {len(found)} snapshots and no refs/main to choose; pass "
                      f"one of them, e.g. {found[-1]}")


def _cached_snapshot(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError) as exc:
        logger.debug("%s not in the HF cache: %r", repo_id, exc)
        raise SourceError(
            f"{repo_id}: not a local path, and the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) holds no snapshot of it; download it with "
            f"`hf download {repo_id}` (or pass a directory)") from exc
