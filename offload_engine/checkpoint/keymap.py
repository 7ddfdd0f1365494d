"""Checkpoint keys -> the model's tensors, through transformers' own conversion mapping.

transformers renames some checkpoint keys while loading (GPT-NeoX's ``embed_out`` is
the model's ``lm_head``; Mixtral's ``block_sparse_moe`` is ``mlp``) and merges others
(each expert's ``gate_proj``/``up_proj``/``down_proj`` become the experts module's fused
3-D ``gate_up_proj``/``down_proj``). We read keys ourselves, so we ask transformers for
the same mapping (``get_model_conversion_mapping``) and apply it, with one difference:
experts are never merged into a layer-sized tensor. Each expert's pieces are run through
the converter's own operations on their own (a stack of one), giving that expert's slice
of the fused parameter, which is stored as one quantized matrix named
``<experts module>.<parameter>.<expert>.weight`` (see :mod:`offload_engine.model.experts`).
Memory stays at one expert's matrices, not a layer's. Pre-quantized pieces
(per-expert AWQ/GPTQ/compressed-tensors linears) are merged by gathering their rows in
the order the same converter puts them (:meth:`KeyMap._row_map`), never dequantized.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Sequence
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from ..errors import ConversionError
from ..model.experts import ExpertsInfo, expert_module_name, find_experts
from ..quant.quantize import QuantizedWeight

logger = logging.getLogger(__name__)


class PerExpert(Sequence):
    """A fused experts parameter a source hands over one expert at a time (gpt-oss's MXFP4
    ``gate_up_proj_blocks``/``_scales``): item e is expert e's matrix, already as
    (out_features, in_features), a QuantizedWeight or a float tensor, read when asked."""

    def __init__(self, count: int, read: Callable[[int], object]):
        self.count, self.read = count, read

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, expert):
        if not 0 <= expert < self.count:
            raise IndexError(expert)
        return self.read(expert)


class KeyMap:
    """How each source checkpoint key becomes one or more of the model's tensors."""

    def __init__(self, skeleton, source_names: Iterable[str]):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            apply_renamings,
            rename_source_key,
        )

        transforms = get_model_conversion_mapping(skeleton)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        meta = dict(skeleton.state_dict(keep_vars=True))
        prefix = skeleton.base_model_prefix
        self.skeleton = skeleton
        self.experts: Dict[str, ExpertsInfo] = find_experts(skeleton)
        self._params = {f"{name}.{m.param}": (info, m) for name, info in self.experts.items()
                        for m in info.matrices}
        self.renamed: Dict[str, str] = {}  # source key -> model tensor name
        self._piece: Dict[str, Tuple[tuple, str]] = {}  # source key -> (group, pattern)
        self._members: Dict[tuple, set] = {}  # (model param, expert) -> its source keys
        self._converter: Dict[tuple, object] = {}
        self._row_maps: Dict[tuple, tuple] = {}  # see _row_map
        for key in source_names:
            target, pattern = rename_source_key(key, renamings, converters, prefix, meta)
            if target not in meta and key in meta:  # as transformers does: keep the key
                target, pattern = key, None
            if pattern is None:
                self.renamed[key] = target
                continue
            expert = _expert_index(apply_renamings(key, renamings), pattern)
            if target not in self._params or expert is None:
                raise ConversionError(
                    f"checkpoint tensor {key!r} converts to {target!r}, which is not an experts "
                    "parameter offload-engine quantizes; this model type "
                    f"({skeleton.config.model_type}) is not supported")
            group = (target, expert)
            self._piece[key] = (group, pattern)
            self._members.setdefault(group, set()).add(key)
            self._converter[group] = by_pattern[pattern]
        renamed = sorted(k for k, t in self.renamed.items() if k != t)
        if renamed:
            logger.info("checkpoint keys renamed as transformers does: %s%s",
                        ", ".join(f"{k} -> {self.renamed[k]}" for k in renamed[:3]),
                        " ..." if len(renamed) > 3 else "")

    def target(self, key: str) -> Optional[str]:
        """The model tensor a plain (not merged) source key is, or None for an expert piece."""
        return self.renamed.get(key)

    def stream(self, tensors: Iterable[Tuple[str, torch.Tensor]]
               ) -> Iterator[Tuple[str, object, List[str]]]:
        """(model tensor name, tensor, source keys consumed) for every source tensor.

        Expert pieces are held until every piece of that expert's matrix has arrived
        (checkpoints keep them together), then converted; fused 3-D expert tensors
        are split into one matrix per expert.
        """
        pending: Dict[tuple, Dict[str, torch.Tensor]] = {}
        for key, tensor in tensors:
            if key in self.renamed:
                yield from self._plain(key, self.renamed[key], tensor)
                continue
            group, pattern = self._piece[key]
            pieces = pending.setdefault(group, {})
            pieces[key] = tensor
            if set(pieces) == self._members[group]:
                del pending[group]
                yield _weight_name(*group), self._convert(group, pieces), sorted(pieces)
        if pending:
            group = next(iter(pending))
            missing = sorted(self._members[group] - set(pending[group]))
            raise ConversionError(f"the checkpoint lacks {missing[:3]} (pieces of {group[0]} "
                                  f"for expert {group[1]}); is it complete?")

    def _plain(self, key: str, target: str, tensor):
        found = self._params.get(target)
        if found is not None and isinstance(tensor, PerExpert):
            yield from self._per_expert(key, target, tensor, *found)
            return
        if found is None or not isinstance(tensor, torch.Tensor):
            yield target, tensor, [key]
            return
        info, matrix = found
        if tensor.dim() != 3 or tensor.shape[0] != info.num_experts:
            raise ConversionError(f"checkpoint tensor {key!r} has shape {tuple(tensor.shape)}; "
                                  f"{target} expects {info.num_experts} experts")
        for expert in range(info.num_experts):
            yield (_weight_name(target, expert), _oriented(tensor[expert], matrix),
                   [key] if expert == info.num_experts - 1 else [])

    def _per_expert(self, key: str, target: str, stack: PerExpert, info, matrix):
        if len(stack) != info.num_experts:
            raise ConversionError(f"checkpoint tensor {key!r} holds {len(stack)} experts; "
                                  f"{target} expects {info.num_experts}")
        for expert in range(info.num_experts):
            weight = stack[expert]
            shape = ((weight.out_features, weight.in_features)
                     if isinstance(weight, QuantizedWeight) else tuple(weight.shape))
            if shape != (matrix.out_features, matrix.in_features):
                raise ConversionError(f"checkpoint tensor {key!r}: expert {expert} is {shape}; "
                                      f"{target} expects ({matrix.out_features}, "
                                      f"{matrix.in_features}) per expert")
            yield (_weight_name(target, expert), weight,
                   [key] if expert == info.num_experts - 1 else [])

    def _convert(self, group: tuple, pieces: Dict[str, object]):
        """One expert's matrix (out, in): its slice of the fused parameter, by the
        converter's own operations; from pre-quantized pieces, their rows gathered."""
        if any(isinstance(p, QuantizedWeight) for p in pieces.values()):
            return self._convert_quantized(group, pieces)
        return self._run_converter(group, pieces)

    def _run_converter(self, group: tuple, pieces: Dict[str, torch.Tensor]) -> torch.Tensor:
        target, _ = group
        converter = copy.deepcopy(self._converter[group])
        collected: Dict[str, list] = {}
        for key, tensor in pieces.items():
            collected.setdefault(self._piece[key][1], []).append(tensor)
        for op in converter.operations:
            collected = op.convert(collected, source_patterns=converter.source_patterns,
                                   target_patterns=converter.target_patterns,
                                   full_layer_name=target, model=self.skeleton,
                                   config=self.skeleton.config, missing_keys=None)
        values = list(collected.values())
        info, matrix = self._params[target]
        expected = (1, *_stored_shape(matrix))
        if len(values) != 1 or tuple(values[0].shape) != expected:
            raise ConversionError(
                f"converting the pieces of {target} for expert {group[1]} gave "
                f"{[tuple(v.shape) for v in values]}, not one {expected} slice; this model "
                f"type ({self.skeleton.config.model_type}) is not supported")
        return _oriented(values[0][0], matrix)

    def _convert_quantized(self, group: tuple, pieces: Dict[str, object]) -> QuantizedWeight:
        """Pre-quantized pieces (per-expert AWQ/GPTQ/compressed-tensors linears) merged
        exactly: every component of ours is one row per output feature with the groups
        along the input, so a merge that only stacks and concatenates whole rows (gate
        and up into gate_up) is a gather of rows; anything else is refused."""
        target, expert = group
        keys = sorted(pieces)
        weights = [pieces[k] for k in keys]
        floats = [k for k in keys if not isinstance(pieces[k], QuantizedWeight)]
        if floats:
            raise ConversionError(f"{target} for expert {expert}: {floats[0]} is stored in float "
                                  "but the other pieces are quantized; one matrix holds one "
                                  "spec. Convert the unquantized original instead")
        first = weights[0]
        if any(w.spec != first.spec or w.in_features != first.in_features for w in weights):
            raise ConversionError(f"{target} for expert {expert}: its pieces {keys} are "
                                  "quantized differently (spec or input size); one matrix "
                                  "holds one spec")
        piece, row = self._row_map(group, keys, [w.out_features for w in weights],
                                   first.in_features)
        offsets = torch.tensor([0] + [w.out_features for w in weights]).cumsum(0)
        index = offsets[piece] + row
        parts = {name: torch.cat([w.components()[name] for w in weights])[index]
                 for name in first.components()}
        return QuantizedWeight.from_parts(parts, first.spec, int(index.numel()),
                                          first.in_features)

    def _row_map(self, group: tuple, keys: List[str], rows: List[int], columns: int):
        """(piece, row) of each output row of the merged matrix, learnt by running the
        converter on int64 probes whose every element says where it came from (piece,
        row, column); cached per converter and piece shapes (every expert of every layer
        merges alike). A ConversionError if an output row is not one whole input row."""
        patterns = tuple(self._piece[k][1] for k in keys)
        cache_key = (id(self._converter[group]), patterns, tuple(rows), columns)
        if cache_key in self._row_maps:
            return self._row_maps[cache_key]
        if max(rows + [columns]) >= 1 << 20 or len(keys) >= 1 << 20:
            raise ConversionError(f"{group[0]}: pieces of {rows} x {columns} are too large to "
                                  "map row by row")
        col = torch.arange(columns, dtype=torch.int64)
        probes = {k: (i << 40) + (torch.arange(n, dtype=torch.int64) << 20)[:, None] + col
                  for i, (k, n) in enumerate(zip(keys, rows, strict=True))}
        merged = self._run_converter(group, probes)
        first = merged[:, :1]
        if merged.dtype != torch.int64 or not torch.equal(merged - col, first.expand_as(merged)):
            raise ConversionError(
                f"transformers merges the pieces of {group[0]} other than by whole rows; "
                "pre-quantized experts of this model type "
                f"({self.skeleton.config.model_type}) cannot be imported exactly. Convert the "
                "unquantized original instead")
        found = (first[:, 0] >> 40, (first[:, 0] >> 20) & ((1 << 20) - 1))
        self._row_maps[cache_key] = found
        return found


def _expert_index(key: str, pattern: str) -> Optional[int]:
    regex = re.escape(pattern).replace(r"\*", r"(\d+)")
    match = re.search(regex, key)
    return int(match.group(1)) if match and match.groups() else None


def _weight_name(param_name: str, expert: int) -> str:
    module, _, param = param_name.rpartition(".")
    return f"{expert_module_name(module, param, expert)}.weight"


def _stored_shape(matrix) -> tuple:
    if matrix.transposed:
        return (matrix.in_features, matrix.out_features)
    return (matrix.out_features, matrix.in_features)


def _oriented(tensor: torch.Tensor, matrix) -> torch.Tensor:
    """One expert's matrix as (out_features, in_features), like an nn.Linear weight."""
    return (tensor.t() if matrix.transposed else tensor).contiguous()
