"""Checksums of a quantized directory: recorded at conversion, checked by inspect and load.

The manifest's ``checksums`` holds a SHA-256 of every shard (the same digest
``sha256sum`` prints) and a CRC-32 of every stored tensor's bytes, so a corrupt
shard can be named down to the tensor. Loading reads every tensor anyway and checks
its CRC-32 as it arrives (about 1 GB/s of one core, a few percent of load time, see
the README); ``inspect`` re-reads whole shards and checks both. A manifest written
before checksums existed still loads, with a note.
"""

from __future__ import annotations

import hashlib
import logging
import zlib
from pathlib import Path
from typing import Dict, Tuple

import torch

from ..errors import FormatError
from . import stfile

logger = logging.getLogger(__name__)
SHARD_ALGORITHM = "sha256"
TENSOR_ALGORITHM = "crc32"
CHUNK_BYTES = 8 * 1024 * 1024
NO_CHECKSUMS_NOTE = ("%s: the manifest has no checksums (written by an older release), so "
                     "corrupt bytes cannot be detected; re-convert the model to add them")


def _crc_hex(value: int) -> str:
    return f"{value & 0xFFFFFFFF:08x}"


def tensor_crc(tensor: torch.Tensor) -> str:
    """CRC-32 of a tensor's bytes as stored (row-major, native little-endian)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return _crc_hex(zlib.crc32(flat.view(torch.uint8).numpy()) if flat.numel() else 0)


def shard_checksums(path: Path) -> Tuple[str, Dict[str, str]]:
    """(SHA-256 of the file, {tensor key: CRC-32 of its bytes}) in one pass over the file."""
    infos = sorted(stfile.read_header(path).values(), key=lambda info: info.begin)
    digest = hashlib.sha256()
    crcs: Dict[str, str] = {}
    with open(path, "rb") as handle:
        position = 0
        for info in infos:
            _feed(handle, info.begin - position, digest)
            crcs[info.key] = _crc_hex(_feed(handle, info.nbytes, digest))
            position = info.end
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest(), crcs


def _feed(handle, nbytes: int, digest) -> int:
    """Read NBYTES into DIGEST; return their running CRC-32."""
    crc = 0
    while nbytes > 0:
        chunk = handle.read(min(nbytes, CHUNK_BYTES))
        if not chunk:
            raise FormatError(f"{handle.name}: file ends early; re-convert the model")
        digest.update(chunk)
        crc = zlib.crc32(chunk, crc)
        nbytes -= len(chunk)
    return crc


def record(directory: Path, shards) -> dict:
    """The manifest's ``checksums`` entry for the shards just written into DIRECTORY."""
    entry = {"shard_algorithm": SHARD_ALGORITHM, "tensor_algorithm": TENSOR_ALGORITHM,
             "shards": {}, "tensors": {}}
    for shard in shards:
        entry["shards"][shard], entry["tensors"][shard] = shard_checksums(Path(directory) / shard)
    return entry


def verify_shards(directory: Path, manifest, progress=None) -> bool:
    """Re-read every shard and compare; raise naming the shard and tensor. False: none recorded.

    ``progress`` is called with each shard's name before it is read.
    """
    checksums = getattr(manifest, "checksums", None) or {}
    if not checksums.get("shards"):
        logger.warning(NO_CHECKSUMS_NOTE, directory)
        return False
    owners = _owners(manifest)
    for shard, expected in checksums["shards"].items():
        if progress is not None:
            progress(shard)
        actual, crcs = shard_checksums(Path(directory) / shard)
        if actual == expected:
            continue
        recorded = checksums.get("tensors", {}).get(shard, {})
        bad = [key for key, crc in crcs.items() if recorded.get(key) not in (None, crc)]
        where = _tensor_words(bad[0], owners.get((shard, bad[0]))) if bad else "its header"
        raise FormatError(f"{Path(directory) / shard}: checksum mismatch in {where}"
                          f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}: the file is "
                          "corrupt; re-convert the model (or copy the shard again)")
    return True


def _tensor_words(key: str, owner) -> str:
    """"tensor 'a.qweight' (of a)", or just "tensor 'a'" when the key is the tensor's name."""
    return f"tensor {key!r}" + (f" (of {owner})" if owner and owner != key else "")


def _owners(manifest) -> Dict[Tuple[str, str], str]:
    """(shard, key) -> the logical tensor it belongs to, for error messages."""
    return {(comp.shard, comp.key): name for name, entry in manifest.tensors.items()
            for comp in entry.components.values()}


class TensorVerifier:
    """Checks each tensor's CRC-32 as the loader reads it into host memory."""

    def __init__(self, directory: Path, manifest, note_missing: bool = True):
        self.directory = Path(directory)
        checksums = getattr(manifest, "checksums", None) or {}
        self.expected = checksums.get("tensors") or {}
        if not self.expected and note_missing:
            logger.warning(NO_CHECKSUMS_NOTE, self.directory)

    def check(self, name: str, comp, tensor: torch.Tensor) -> None:
        """Raise FormatError naming shard and tensor when TENSOR's bytes differ."""
        expected = self.expected.get(comp.shard, {}).get(comp.key)
        if expected is None:
            return
        if tensor_crc(tensor) != expected:
            raise FormatError(
                f"{self.directory / comp.shard}: checksum mismatch in "
                f"{_tensor_words(comp.key, name)}: the file is corrupt; re-convert the model "
                f"(or copy the shard again); `offload-engine inspect {self.directory}` "
                "checks every shard")
