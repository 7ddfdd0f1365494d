"""Where each decoder layer part runs: on the device (resident or streamed) or on the CPU.

One function, :func:`place_parts`, decides for both `offload-engine plan` and the runtime.
A *part* is one decoder layer's attention (q/k/v/o projections) or its MLP (gate/up/down,
or its experts). Weights outside the layers (lm_head) always stay with the device cache.

At batch 1 a streamed weight crosses the host->device link once per token (12-25 GB/s on
PCIe) while the same weight computed by the CPU is read from host RAM at DRAM speed, so
computing the parts that do not fit on the card on the CPU beats streaming them when
``cpu_bandwidth > h2d_bandwidth`` (llama.cpp's partial offload). The planner compares:

- stream: the static cache policy (what fits resident, the rest copied every pass);
- hybrid: parts resident on the device while they fit (attention first: it is small and
  its KV cache stays on the card, then MLPs layer by layer), every other part computed on
  the CPU from host RAM; activations cross the link twice per CPU part (in, out).

Both predictions are for a decode step at the request's batch. The CPU kernel
(kernels/cpu_int4.py) reads a weight once per block of up to ``CPU_ROWS_PER_PASS`` rows,
so a larger batch costs the CPU more passes while a streamed byte serves the whole batch:
that is why streaming wins for prefill and large batches.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import ConfigError
from .words import PLACEMENTS

ATTENTION, MLP = "attention", "mlp"
EXPERTS_CPU = "experts-cpu"  # cold experts on the CPU (planning/moe_placement.py)
ON_DEVICE, ON_CPU = "device", "cpu"
CPU_ROWS_PER_PASS = 4  # BLOCK_M of torch's CPU int4 kernel (aten/native/cpu/int4mm_kernel.cpp)
# ESTIMATE: one activation transfer across PCIe plus the synchronisation it forces; a
# hidden state of a 32B model is 10 KiB, so the time is latency, not bandwidth.
CROSSING_S = 20e-6
CROSSINGS_PER_CPU_PART = 2  # the residual stream stays on the device: in, and back out
_PART_PATTERN = re.compile(r"^(?P<prefix>.*\.layers\.(?P<layer>\d+)\.(?P<kind>self_attn|mlp))\.")


@dataclass(frozen=True)
class Part:
    """One decoder layer part and the weights in it."""

    layer: int  # decoder layer index
    kind: str  # ATTENTION or MLP
    module: str  # the module to run elsewhere, e.g. model.layers.3.mlp
    names: Tuple[str, ...]  # its quantized linears, in execution order
    nbytes: int  # their stored (packed) bytes: what the CPU reads per pass


@dataclass
class Placement:
    """Which parts run on the CPU, and the predictions that chose it."""

    mode: str  # what was asked: auto, stream, cpu, mlp-cpu, experts-cpu
    chosen: str  # "stream" (nothing on the CPU), "hybrid" or "experts-cpu"
    cpu_parts: List[Part] = field(default_factory=list)
    device_parts: List[Part] = field(default_factory=list)
    stream_step_s: Optional[float] = None  # PREDICTION, None when not computed
    hybrid_step_s: Optional[float] = None  # PREDICTION, None when not computed (for a MoE
    # model: with its cold experts computed on the CPU, planning/moe_placement.py)
    reason: str = ""
    expert_cpu_bytes_per_step: Optional[int] = None  # MoE: cold expert bytes the CPU reads

    @property
    def cpu_names(self) -> frozenset:
        return frozenset(name for part in self.cpu_parts for name in part.names)

    @property
    def cpu_bytes(self) -> int:
        return sum(part.nbytes for part in self.cpu_parts)

    def where(self, part: Part) -> str:
        return ON_CPU if part in self.cpu_parts else ON_DEVICE

    def summary(self) -> Dict[str, object]:
        return {"placement": self.mode, "placement_chosen": self.chosen,
                "cpu_parts": len(self.cpu_parts), "cpu_part_bytes": self.cpu_bytes,
                "predicted_stream_step_s": self.stream_step_s,
                "predicted_hybrid_step_s": self.hybrid_step_s, "placement_reason": self.reason,
                **({} if self.expert_cpu_bytes_per_step is None else
                   {"expert_cpu_bytes_per_step": self.expert_cpu_bytes_per_step})}


def split_parts(entries: Sequence[Tuple[str, int]]) -> List[Part]:
    """Group (linear name, stored bytes) in execution order into decoder layer parts."""
    grouped: Dict[Tuple[int, str], list] = {}
    order: List[Tuple[int, str]] = []
    modules: Dict[Tuple[int, str], str] = {}
    for name, nbytes in entries:
        match = _PART_PATTERN.match(name)
        if match is None:
            continue  # lm_head and anything outside the layers stays with the device cache
        key = (int(match["layer"]), ATTENTION if match["kind"] == "self_attn" else MLP)
        if key not in grouped:
            grouped[key], modules[key] = [], match["prefix"]
            order.append(key)
        grouped[key].append((name, nbytes))
    return [Part(layer, kind, modules[(layer, kind)], tuple(n for n, _ in grouped[(layer, kind)]),
                 sum(b for _, b in grouped[(layer, kind)])) for layer, kind in order]


def check_placement(mode: str) -> None:
    if mode not in PLACEMENTS:
        raise ConfigError(f"unknown --placement {mode!r}: use one of {', '.join(PLACEMENTS)}")


def place_parts(parts: List[Part], mode: str, room: Optional[int] = None,
                bandwidths: Optional[Dict[str, float]] = None, batch: int = 1,
                stream_step_s: Optional[float] = None,
                stream_weight_s: float = 0.0) -> Placement:
    """Decide where each part runs.

    ``mode``: stream (none on the CPU), cpu (all), mlp-cpu (every MLP), auto (the faster
    prediction). For auto: ``room`` is the device bytes for weights (None: unbounded),
    ``bandwidths`` the profile's ``device``, ``h2d`` and ``cpu`` bytes/s, ``stream_step_s``
    the planner's stream prediction and ``stream_weight_s`` its weight part (resident read
    plus stream), which the hybrid replaces by its own.
    """
    check_placement(mode)
    if mode == "stream":
        return Placement(mode, "stream", [], list(parts), reason="--placement stream")
    if mode == EXPERTS_CPU:  # the experts are not parts: every part stays on the device
        return Placement(mode, EXPERTS_CPU, [], list(parts), reason=f"--placement {mode}")
    if mode in ("cpu", "mlp-cpu"):
        on_cpu = [p for p in parts if mode == "cpu" or p.kind == MLP]
        return Placement(mode, "hybrid", on_cpu, [p for p in parts if p not in on_cpu],
                         reason=f"--placement {mode}")
    return _auto(parts, room, bandwidths or {}, batch, stream_step_s, stream_weight_s)


def _auto(parts, room, bandwidths, batch, stream_step_s, stream_weight_s) -> Placement:
    cpu_bw = bandwidths.get("cpu", 0.0)
    total = sum(p.nbytes for p in parts)
    if room is None or total <= room:
        return Placement("auto", "stream", [], list(parts), stream_step_s, None,
                         "every weight fits on the device")
    if not cpu_bw or stream_step_s is None:
        return Placement("auto", "stream", [], list(parts), stream_step_s, None,
                         "no cpu_bandwidth_gb_s in the hardware profile")
    device, cpu, used = [], [], 0
    for part in sorted(parts, key=lambda p: (p.kind != ATTENTION, p.layer)):
        if used + part.nbytes <= room:
            device.append(part)
            used += part.nbytes
        else:
            cpu.append(part)
    passes = -(-batch // CPU_ROWS_PER_PASS)
    cpu_s = sum(p.nbytes for p in cpu) / cpu_bw * passes
    hybrid_weights = used / bandwidths["device"] + cpu_s
    hybrid = (stream_step_s - stream_weight_s + hybrid_weights
              + len(cpu) * CROSSINGS_PER_CPU_PART * CROSSING_S)
    if hybrid < stream_step_s:
        return Placement("auto", "hybrid", cpu, device, stream_step_s, hybrid,
                         "hybrid predicted faster")
    return Placement("auto", "stream", [], list(parts), stream_step_s, hybrid,
                     "streaming predicted faster")
