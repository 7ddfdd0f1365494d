"""A .gguf file, read block by block with the gguf package's memory-mapped reader.

Linear weights of an exact GGUF type are imported exactly, each with its own type (see
:mod:`offload_engine.quant.gguf_blocks`): Q4_0, Q4_1 and Q8_0 codes, fp16 scales and
minimums are copied into our layout; Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q5_0 and Q5_1 blocks
are copied as they are. So a Q4_K_M file (Q4_K and Q6_K, with Q5_0/Q8_0 where a row is not a whole
number of 256-element super-blocks) is copied whole. The manifest's spec is that of the
exact type holding most linear parameters; the others are named per tensor. Linears of
other types (F16/F32, the IQ and TQ types) are dequantized and quantized here
with ``requantize_spec``, listed in ``requantized`` as the AWQ/GPTQ sources list their
float ``lm_head``, provided exact types hold more than half of the linear parameters;
otherwise the file is refused before any work, unless ``--requantize``. Every other tensor
(norms, embeddings, and with ``--requantize`` every linear) is dequantized with
``gguf.quants.dequantize``, one tensor at a time, so peak RAM stays about twice the
largest tensor in float32 plus the shard buffer, not 4 bytes per parameter.

Tensor names and the row order of llama's q/k projections (llama.cpp permutes them
for its rotary layout) come from transformers' own GGUF mapping, so a model imported
here is the model ``AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`` builds.
"""

from __future__ import annotations

import logging
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from ...errors import InexactImportError, SourceError
from ...model import architecture
from ...quant.gguf_blocks import EXACT_TYPES, import_rows
from ...quant.layout import QuantSpec

# What float linears of an import whose main type is a raw-block one (Q4_K...) are
# quantized to: we write no GGUF blocks, and int8 g32 with fp16 scales is Q8_0's form.
RAW_IMPORT_FLOAT_SPEC = QuantSpec("int8", 32, "fp16")
GGUF_EMBEDDING = "token_embd.weight"  # llama.cpp's name for the input embedding, every arch

logger = logging.getLogger(__name__)
# the smallest header entries: a tensor info (name length 8, a 1-byte name, n_dims 4, no
# dimension, type 4, offset 8) and a key/value (key length 8, 1-byte key, type 4, a 1-byte
# value): a count above file size / these cannot be real
MIN_TENSOR_INFO_BYTES = 25
MIN_KV_BYTES = 14
_SHORT = re.compile(r"cannot reshape array of size \d+ into shape|mmap length is greater")


@dataclass
class GGUFTensorPlan:
    """One GGUF tensor and what becomes of it."""

    gguf_name: str  # e.g. "blk.0.attn_q.weight"
    hf_name: str  # e.g. "model.layers.0.self_attn.q_proj.weight"
    type_name: str  # GGML type, e.g. "Q4_1"
    shape: tuple  # logical (N, K) or (N,), HF order
    nbytes: int  # bytes stored in the file
    is_linear: bool  # a weight we hold quantized
    row_order: Optional[np.ndarray] = None  # rows to gather (llama q/k), None: as stored
    embedding_copy: bool = False  # the untied output: a copy of the tied embedding's codes


class GGUFSource:
    """A .gguf file: exact import of every linear of an exact type, or ``requantize``."""

    kind = "gguf"

    def __init__(self, path: Path, requantize: bool = False):
        from gguf import GGUFReader

        self.path = Path(path)
        _check_counts(self.path)
        try:
            self._reader = GGUFReader(self.path)
            self.config = _read_config(self.path)
        except (ValueError, OSError, KeyError, IndexError) as exc:
            if _SHORT.search(str(exc)):
                raise SourceError(f"{self.path}: the file is truncated (its tensor data runs "
                                  f"past its end at {self.path.stat().st_size} bytes); "
                                  "download it again") from None
            raise SourceError(f"{self.path}: cannot read this GGUF file ({exc})") from exc
        self._processor = _tensor_processor(self._reader, self.config)
        # a quantized embedding tied to the output: the output gets its own exact copy
        self.untied_output = not requantize and _untie_output(self._reader, self.config)
        self.plans = self._plan_tensors()
        self.linear_types = sorted({p.type_name for p in self.plans if p.is_linear})
        self.requantize = requantize
        # the exact type holding most linear parameters (None: --requantize, none copied)
        self.exact_type = None if requantize else _main_exact_type(self.path, self.plans)
        self.import_spec = None if requantize else EXACT_TYPES[self.exact_type].spec
        # what the linears of other types are quantized to, here
        self.requantize_spec = None if self.import_spec is None or not (
            self.import_spec.raw_blocks) else RAW_IMPORT_FLOAT_SPEC
        self.requantized = [] if requantize else self._other_type_linears()

    @classmethod
    def claims(cls, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() == ".gguf"

    @property
    def source_format(self) -> str:
        return f"gguf {'/'.join(self.linear_types)}"

    def _imports_exactly(self, plan: GGUFTensorPlan) -> bool:
        return not self.requantize and plan.is_linear and plan.type_name in EXACT_TYPES

    def _other_type_linears(self) -> List[str]:
        """Linears of no exact type, named and logged once: they are quantized here."""
        others = [p for p in self.plans if p.is_linear and not self._imports_exactly(p)]
        if others:
            spec = self.requantize_spec or self.import_spec
            logger.warning("%s: %d of %d linear weights have no exact import (%s); they are "
                           "dequantized and quantized here as %s g%d with %s scales",
                           self.path, len(others), sum(p.is_linear for p in self.plans),
                           _names_by_type(others), spec.scheme, spec.group_size,
                           spec.scale_dtype)
        return [p.hf_name for p in others]

    def _plan_tensors(self) -> List[GGUFTensorPlan]:
        from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

        skeleton = architecture.build_skeleton(self.config)
        linears = architecture.find_linears(skeleton, self.config)
        weight_names = {f"{name}.weight" for name in linears}
        name_map = get_gguf_hf_weights_map(skeleton, self._processor)
        plans = []
        for tensor in self._reader.tensors:
            hf_name = name_map.get(tensor.name)
            if hf_name is None:
                logger.info("%s: tensor %s has no place in the model; skipped", self.path,
                            tensor.name)
                continue
            shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists K first
            plan = GGUFTensorPlan(tensor.name, hf_name, tensor.tensor_type.name, shape,
                                  int(tensor.n_bytes), hf_name in weight_names)
            if plan.is_linear:
                plan.row_order = self._row_order(plan)
            plans.append(plan)
            if self.untied_output and tensor.name == GGUF_EMBEDDING:
                plans.append(GGUFTensorPlan(tensor.name, "lm_head.weight", plan.type_name,
                                            shape, plan.nbytes, "lm_head.weight" in weight_names,
                                            embedding_copy=True))
        return plans

    def _row_order(self, plan: GGUFTensorPlan) -> Optional[np.ndarray]:
        """The row gather transformers' processor applies to this weight (None: none).

        Run on a column of row indices: a processor that does anything but reorder rows
        (or renames the tensor) is not something an exact import can follow.
        """
        rows = plan.shape[0]
        index = np.arange(rows, dtype=np.int64).reshape(rows, 1)
        try:
            result = self._processor.process(weights=index, name=plan.gguf_name,
                                             tensor_key_mapping={}, parsed_parameters={})
            order = np.asarray(result.weights).reshape(-1)
            ok = result.name == plan.gguf_name and np.array_equal(np.sort(order), index[:, 0])
        except (ValueError, TypeError, KeyError, IndexError):
            ok = False
        if not ok:
            raise SourceError(f"{self.path}: tensor {plan.gguf_name} is transformed on load by "
                              "transformers in a way an import cannot follow; this "
                              "architecture is not supported from GGUF")
        return None if np.array_equal(order, index[:, 0]) else order

    def tensor_list(self) -> List[Tuple[str, str, tuple, int]]:
        """(name, GGUF type, shape, stored bytes) of every tensor the model uses."""
        return [(p.hf_name, p.type_name, p.shape, p.nbytes) for p in self.plans]

    def iter_tensors(self) -> Iterator[Tuple[str, object]]:
        """(name, QuantizedWeight) for linears imported exactly, (name, float tensor) else."""
        tensors = {t.name: t for t in self._reader.tensors}
        with open(self.path, "rb") as file:
            for plan in self.plans:
                tensor = tensors[plan.gguf_name]
                raw = _read_raw(file, tensor, self.path)
                if self._imports_exactly(plan):
                    rows = raw if plan.row_order is None else raw[plan.row_order]
                    yield plan.hf_name, import_rows(plan.type_name, rows, plan.shape[1],
                                                    plan.hf_name)
                else:
                    yield plan.hf_name, self._dequantized(tensor, raw, plan)
                del raw

    def read_tensor(self, name: str) -> torch.Tensor:
        """One tensor by its transformers name, dequantized to float32 (random access, for
        calibration: it reads only that tensor's bytes)."""
        plan = next((p for p in self.plans if p.hf_name == name), None)
        if plan is None:
            raise SourceError(f"{self.path}: no tensor {name!r} in this GGUF file")
        tensor = next(t for t in self._reader.tensors if t.name == plan.gguf_name)
        with open(self.path, "rb") as file:
            return self._dequantized(tensor, _read_raw(file, tensor, self.path), plan)

    def _dequantized(self, tensor, raw: np.ndarray, plan: GGUFTensorPlan) -> torch.Tensor:
        """Float32 values of one tensor, as transformers loads them (processor applied)."""
        from gguf.quants import dequantize

        try:
            values = dequantize(raw, tensor.tensor_type)
        except NotImplementedError as exc:
            raise SourceError(f"{self.path}: tensor {plan.gguf_name} has type "
                              f"{plan.type_name}, which the gguf package cannot read") from exc
        result = self._processor.process(weights=values, name=plan.gguf_name,
                                         tensor_key_mapping={}, parsed_parameters={})
        return torch.from_numpy(np.array(result.weights, dtype=np.float32, copy=True))

    def write_side_files(self, destination: Path) -> None:
        from transformers import AutoTokenizer, GenerationConfig

        self.config.save_pretrained(destination)
        GenerationConfig.from_model_config(self.config).save_pretrained(destination)
        tokenizer = AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name)
        tokenizer.save_pretrained(destination)


def _check_counts(path: Path) -> None:
    """Refuse a header whose tensor or key/value count the file cannot hold (a corrupt
    file would otherwise fail deep in the reader, or try to allocate the count)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(24)
        size = path.stat().st_size
    except OSError as exc:
        raise SourceError(f"{path}: cannot read this GGUF file ({exc.strerror or exc})") from None
    if len(head) < 24 or head[:4] != b"GGUF":
        return  # the reader says what is wrong with it
    tensors, kvs = struct.unpack("<QQ", head[8:24])
    for count, least, what in ((tensors, MIN_TENSOR_INFO_BYTES, "tensors"),
                               (kvs, MIN_KV_BYTES, "metadata entries")):
        if count * least > size:
            raise SourceError(f"{path}: the header claims {count} {what}, more than a file of "
                              f"{size} bytes can hold; the file is corrupt, download it again")


def _read_raw(file, tensor, path: Path) -> np.ndarray:
    """One tensor's stored bytes, read from the file into private memory.

    Reading (rather than touching the reader's memory map) keeps the file's pages out of
    this process's resident set, so the RAM a conversion needs is what it holds.
    """
    layout = tensor.data  # a memory-mapped view: its shape and dtype, no page is read
    file.seek(int(tensor.data_offset))
    raw = np.fromfile(file, dtype=layout.dtype, count=layout.size)
    if raw.size != layout.size:
        raise SourceError(f"{path}: tensor {tensor.name} is cut short (truncated file); "
                          "download it again")
    return raw.reshape(layout.shape)


def _read_config(path: Path):
    """The transformers config of a GGUF file, from its metadata alone (no tensors)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)


def _untie_output(reader, config) -> bool:
    """Untie ``config``'s output projection from its embedding when the file stores the tied
    embedding in an exact type that is not raw blocks (Q8_0, Q4_0, Q4_1), and say so.

    llama.cpp computes the output from those quantized codes; tied, we would hold the
    embedding dequantized (bf16: 2 bytes per weight, each value rounded) and multiply by
    that. Untied, the output is an exact copy of the codes that a quantized kernel reads
    (SmolLM2's Q8_0: 30 MB per token instead of 56, values as llama.cpp has them); the
    embedding stays dense for its row gather.
    """
    if not architecture.ties_embeddings(config):
        return False
    embed = next((t for t in reader.tensors if t.name == GGUF_EMBEDDING), None)
    block_type = EXACT_TYPES.get(embed.tensor_type.name) if embed is not None else None
    if block_type is None or block_type.spec.raw_blocks:
        return False
    for holder in {id(c): c for c in (config, architecture.text_config(config))}.values():
        holder.tie_word_embeddings = False
    return True


def _tensor_processor(reader, config):
    """transformers' per-architecture GGUF tensor processor (llama: q/k row order)."""
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        read_field,
    )

    arch = read_field(reader, "general.architecture")[0]
    return TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())


def _linear_parameters_by_type(plans: List[GGUFTensorPlan]) -> Dict[str, int]:
    """GGML type -> parameters of the model's linears stored in it (the untied output is
    the embedding's copy, not a linear the file holds: it does not count)."""
    counts: Dict[str, int] = {}
    for plan in plans:
        if plan.is_linear and not plan.embedding_copy:
            counts[plan.type_name] = counts.get(plan.type_name, 0) + int(np.prod(plan.shape))
    return counts


def _names_by_type(plans: List[GGUFTensorPlan], shown: int = 4) -> str:
    """"Q6_K: lm_head.weight; Q4_1: a, b, ... (+3)": what a message names, type by type."""
    by_type: Dict[str, List[str]] = {}
    for plan in plans:
        by_type.setdefault(plan.type_name, []).append(plan.hf_name)
    parts = []
    for type_name, names in by_type.items():
        more = f" ... (+{len(names) - shown})" if len(names) > shown else ""
        parts.append(f"{type_name}: {', '.join(names[:shown])}{more}")
    return "; ".join(parts)


def _main_exact_type(path: Path, plans: List[GGUFTensorPlan]) -> str:
    """The exact type holding most linear parameters, or a SourceError before any work
    when exact types together hold no more than half of them.

    Parameters, not tensors, decide: what is copied exactly must be the bulk of the
    weights (an F16 output matrix beside Q4_0 linears is quantized here; an IQ4_XS file
    with a few Q5_0 fallbacks is no import, and ``--requantize`` is its name).
    """
    counts = _linear_parameters_by_type(plans)
    if not counts:
        raise SourceError(f"{path}: no linear weights of the model were found in this file")
    exact = [t for t in counts if t in EXACT_TYPES]
    if 2 * sum(counts[t] for t in exact) > sum(counts.values()):
        return max(exact, key=counts.get)
    raise _no_majority_error(path, plans, counts)


def _no_majority_error(path: Path, plans: List[GGUFTensorPlan],
                       counts: Dict[str, int]) -> InexactImportError:
    """The refusal: every linear type with its tensors and share of the parameters."""
    total = sum(counts.values())
    listing = []
    for type_name, parameters in sorted(counts.items(), key=lambda kv: -kv[1]):
        names = [p.gguf_name for p in plans if p.is_linear and p.type_name == type_name]
        listing.append(f"{type_name}: {len(names)} tensors, {100 * parameters / total:.1f}% "
                       f"of the parameters ({names[0]}{', ...' if len(names) > 1 else ''})")
    inexact = sorted(t for t in counts if t not in EXACT_TYPES)
    share = 100 * sum(p for t, p in counts.items() if t in EXACT_TYPES) / total
    why = (f"exact types hold {share:.1f}% of their parameters, not more than half; types "
           f"{', '.join(inexact)} have no exact import")
    return InexactImportError(
        f"{path}: its linear weights cannot be imported exactly ({why}; linears by type: "
        f"{'; '.join(listing)}). Exact types: {', '.join(EXACT_TYPES)}. Pass --requantize to "
        "dequantize all of them and quantize again with --scheme/--group-size (lossy: see "
        "docs/import.md for what it costs)")
