"""Offline step: turn a source checkpoint into a quantized directory.

The output is written into a temporary sibling directory and renamed into place
only when everything (shards, side files, manifest) is written, so an interrupted
or failed conversion never leaves a directory that loads.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..errors import ConversionError
from ..model import architecture
from ..model.experts import find_experts, quantized_linears
from ..quant.layout import QuantSpec
from ..quant.quantize import QuantizedWeight, check_finite, quantize_weight
from ..units import format_bytes
from ..version import __version__
from . import checksums, stfile
from .destination import check_destination, staged_output
from .format import MANIFEST_NAME, Component, Manifest, TensorEntry, spec_dict
from .keymap import KeyMap
from .methods import MethodSettings, choose_method, prepare_method
from .sources import open_source

logger = logging.getLogger(__name__)
DEFAULT_SHARD_BYTES = 2 * 1024**3


@dataclass
class ConversionSummary:
    """What a conversion did, for the closing report."""

    destination: Path
    tensors: int
    quantized: int
    bytes_before: int
    bytes_after: int
    seconds: float
    scheme: str
    group_size: int
    imported: str = ""  # source format imported exactly (codes copied), "" if quantized
    method: str = "rtn"
    calibration_seconds: float = 0.0  # awq's layer-by-layer pass, included in seconds
    calibration_layers: int = 0
    # linears the import could not copy, quantized here (AWQ's float lm_head, a GGUF's Q6_K
    # output matrix)
    requantized: tuple = ()

    def lines(self) -> list:
        ratio = self.bytes_before / max(self.bytes_after, 1)
        calibration = [f"  calibration: {self.calibration_seconds:.1f} s for "
                       f"{self.calibration_layers} layers "
                       f"({self.calibration_seconds / max(self.calibration_layers, 1):.2f} "
                       "s/layer)"] if self.calibration_layers else []
        return calibration + [
            f"wrote {self.destination}",
            f"  scheme {self.scheme}, group size {self.group_size}, " + self.how(),
            f"  tensors: {self.tensors} ({self.quantized} quantized)",
            f"  bytes: {format_bytes(self.bytes_before)} -> {format_bytes(self.bytes_after)} "
            + (f"({ratio:.2f}x smaller)" if ratio >= 1 else
               f"({1 / ratio:.2f}x larger: quantized dense tensors are stored dequantized)"),
            f"  time: {self.seconds:.1f} s",
        ]

    def how(self) -> str:
        if not self.imported:
            return f"method {self.method}"
        if not self.requantized:
            return f"imported exactly from {self.imported}"
        return (f"imported exactly from {self.imported}, except {len(self.requantized)} "
                f"linear(s) quantized here: {', '.join(self.requantized[:3])}")


class ShardWriter:
    """Buffers tensors and writes a safetensors shard whenever the buffer is full."""

    def __init__(self, directory: Path, shard_bytes: int):
        self.directory = directory
        self.shard_bytes = shard_bytes
        self.pending: dict = {}
        self.pending_bytes = 0
        self.shards: dict = {}  # file name -> size

    def add(self, key: str, tensor: torch.Tensor) -> Component:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.shard_bytes:
            self.flush()
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += nbytes
        shard = f"model-{len(self.shards) + 1:05d}.safetensors"
        return Component(shard, key, list(tensor.shape), stfile.DTYPE_NAMES[tensor.dtype])

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"model-{len(self.shards) + 1:05d}.safetensors"
        path = self.directory / name
        try:
            save_file(self.pending, str(path), metadata={"format": "pt"})
        except OSError as exc:
            raise ConversionError(f"writing {path} failed: {exc}; free disk space or pick "
                                  "another destination, then run the conversion again") from exc
        _make_readable(path)
        self.shards[name] = path.stat().st_size
        self.pending, self.pending_bytes = {}, 0


def _make_readable(path: Path) -> None:
    """safetensors creates its files mode 0600; give shards the mode every other file of
    the directory gets (0644 under the usual umask), so a shared model folder stays
    readable by the users it is shared with."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def convert(src, dst, spec: QuantSpec = QuantSpec(), force: bool = False,
            shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True,
            requantize: bool = False,
            method: MethodSettings = MethodSettings(),
            notify: Optional[Callable[[str], None]] = None,
            announce: str = "") -> ConversionSummary:
    """Quantize SRC (safetensors directory or .gguf) into the directory DST.

    A source whose weights our layout holds exactly is imported as it is (``spec`` is
    then the source's, and ``method`` does not apply: nothing is rounded); ``requantize``
    quantizes its dequantized weights with ``spec`` and ``method``. A source may yield
    weights of several specs (a GGUF Q4_K_M file): each is written with its own, and the
    float linears it cannot copy are quantized with its ``requantize_spec``. ``notify``
    gets the one-line notes meant for the user: which method ``auto`` chose and why, and
    the estimated time of a long calibration; ``announce``, a line for ``notify`` once the
    source has opened (so a source that cannot be read gets its one-line error alone).
    """
    started = time.perf_counter()
    dst = Path(dst)
    if (Path(src) / MANIFEST_NAME).is_file():
        raise ConversionError(f"{src} is already quantized (it holds {MANIFEST_NAME}): use it "
                              "as it is with run, chat or serve, or quantize the original model")
    check_destination(Path(src), dst, force)  # before reading SRC: a GGUF takes a while
    source = open_source(Path(src), requantize=requantize)
    if announce and notify is not None:
        notify(announce)
    spec = source.import_spec or spec
    if source.import_spec is not None and method.name != "rtn":
        logger.info("%s imports exactly: --method %s does not apply", src, method.name)
        method = MethodSettings()
    skeleton = architecture.build_skeleton(source.config)
    linears = quantized_linears(skeleton, source.config)
    bytes_before = sum(item[3] for item in source.tensor_list())
    parameters = sum(p.numel() for p in skeleton.parameters())  # on meta: shapes only
    method, note = choose_method(method, source.config, parameters)
    if find_experts(skeleton) and method.name != "rtn":
        raise ConversionError(f"--method {method.name} does not quantize mixture-of-experts "
                              "weights yet; use --method rtn (or auto) for this model")
    if note and notify is not None:
        notify(note)
    prepared = prepare_method(method, source, skeleton, spec, progress, notify)  # calibrates
    quantized_here: list = []  # float linears of an import, quantized by _write_tensors
    with staged_output(dst, f"converting {src}") as tmp:
        manifest = _write_tensors(source, skeleton, linears, tmp, spec, shard_bytes, progress,
                                  prepared, quantized_here)
        manifest.source = _source_record(src, source, spec, prepared, quantized_here)
        requantized = manifest.source["requantized"]
        source.write_side_files(tmp)
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
    return ConversionSummary(dst, len(manifest.tensors),
                             sum(e.quantized for e in manifest.tensors.values()),
                             bytes_before, sum(manifest.shards.values()),
                             time.perf_counter() - started, spec.scheme, spec.group_size,
                             source.source_format if source.import_spec else "",
                             method.name, prepared.calibration_seconds,
                             prepared.calibration_layers,
                             tuple(requantized))


def _source_record(src, source, spec: QuantSpec, prepared, quantized_here: list) -> dict:
    """What the manifest says of the source: its format, and whether every weight was
    copied exactly (the linears quantized here, or announced as requantized, were not)."""
    requantized = sorted(set(getattr(source, "requantized", ())) | set(quantized_here))
    if quantized_here:
        logger.warning("%s: %d more linear weights are stored unquantized (%s); they are "
                       "quantized here (%s), not imported exactly", src, len(quantized_here),
                       ", ".join(quantized_here[:3]),
                       getattr(source, "requantize_spec", None) or spec)
    return {
        "kind": source.kind,
        "path": str(Path(src).resolve()),
        "model_type": getattr(source.config, "model_type", None),
        "architectures": getattr(source.config, "architectures", None),
        "format": source.source_format,  # e.g. "gguf Q4_1", "safetensors BF16"
        # codes copied, nothing re-rounded; the requantized linears (an AWQ float
        # lm_head, a GGUF's Q6_K output) are not
        "exact": source.import_spec is not None and not requantized,
        "requantized": requantized,
        "quantization_method": None if source.import_spec else prepared.describe(),
    }


def _write_tensors(source, skeleton, linears, tmp: Path, spec: QuantSpec,
                   shard_bytes: int, progress: bool, prepared, quantized_here: list) -> Manifest:
    """Write every tensor; the float linears an importing source yields (beyond those it
    announced in ``requantized``, e.g. experts left unquantized) go to ``quantized_here``."""
    weight_names = {f"{name}.weight": info for name, info in linears.items()}
    tied = architecture.ties_embeddings(source.config)
    # float linears of an import are quantized with this (we never write raw GGUF blocks)
    float_spec = getattr(source, "requantize_spec", None) or spec
    writer = ShardWriter(tmp, shard_bytes)
    manifest = Manifest(scheme=spec.scheme, group_size=spec.group_size, source={},
                        created_by=f"offload-engine {__version__}", scale_dtype=spec.scale_dtype)
    listing = source.tensor_list()
    stored = {item[0]: item for item in listing}  # name -> (name, dtype, shape, nbytes)
    keymap = KeyMap(skeleton, stored)
    bar = tqdm(total=sum(item[3] for item in listing), unit="B", unit_scale=True,
               desc="quantizing", disable=not progress)
    with bar:
        for name, tensor, keys in keymap.stream(source.iter_tensors()):
            nbytes = sum(stored[key][3] for key in keys)
            source_dtype = stored[keys[0]][1] if keys else None
            if tied and name == "lm_head.weight":
                bar.update(nbytes)  # shares the embedding; nothing to store
                continue
            info = weight_names.get(name)
            if isinstance(tensor, QuantizedWeight):  # imported exactly
                manifest.tensors[name] = _imported_entry(name, tensor, info, writer,
                                                         source_dtype, spec)
                bar.update(nbytes)
                continue
            source_dtype = stfile.DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype))
            tensor = prepared.adjust(name, tensor)  # awq: scales folded into norms/linears
            if info is not None:
                if (source.import_spec is not None
                        and name not in getattr(source, "requantized", ())):
                    quantized_here.append(name)
                entry = _quantized_entry(name, tensor, info, float_spec, writer,
                                         source_dtype, prepared, spec)
            else:
                check_finite(name, tensor)
                entry = TensorEntry(architecture.dense_role(skeleton, name), list(tensor.shape),
                                    source_dtype, {"dense": writer.add(name, tensor)})
            manifest.tensors[name] = entry
            del tensor
            bar.update(nbytes)
    writer.flush()
    missing = sorted(set(weight_names) - set(manifest.tensors))
    if missing:
        raise ConversionError(f"{source.path}: the checkpoint lacks linear weights {missing[:3]}"
                              f"{' ...' if len(missing) > 3 else ''}; is it complete?")
    manifest.shards = dict(writer.shards)
    manifest.checksums = checksums.record(tmp, manifest.shards)
    return manifest


def _quantized_entry(name, tensor, info, spec, writer, source_dtype, prepared,
                     directory_spec: QuantSpec) -> TensorEntry:
    if prepared.settings.name == "rtn":
        quantized = quantize_weight(tensor, spec, name=name)
    else:
        quantized = prepared.quantize(name, tensor, spec)
    return _imported_entry(name, quantized, info, writer, source_dtype, directory_spec)


def _imported_entry(name, quantized: QuantizedWeight, info, writer, source_dtype,
                    directory_spec: QuantSpec) -> TensorEntry:
    """The manifest entry of one quantized weight; it names its spec when that is not the
    directory's."""
    if info is None:
        raise ConversionError(f"tensor {name!r} arrived quantized but the model has no "
                              "linear of that name; the source and its config disagree")
    if not torch.isfinite(quantized.scale_values()).all():
        raise ConversionError(f"tensor {name!r} has non-finite scales: the source checkpoint "
                              "is damaged; re-download or re-export it")
    components = {part: writer.add(f"{name}.{part}", value)
                  for part, value in quantized.components().items()}
    role = "lm_head" if info.is_lm_head else ("expert" if info.is_expert else "linear")
    shape = [quantized.out_features, quantized.in_features]
    own = None if quantized.spec == directory_spec else spec_dict(quantized.spec)
    return TensorEntry(role, shape, source_dtype, components, quant=own)
