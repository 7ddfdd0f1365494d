"""Measure what the planner needs on this machine, and write it as a hardware profile.

Four figures, each timed after a device synchronize:

- host->device GB/s: on CUDA a pinned copy of a large buffer; on CPU what a "copy" is
  there, the reference dequantizer filling a float32 slot (packed INT4 bytes per second);
- device memory GB/s: a large device-to-device copy, (read + write) bytes / time;
- kernel GB/s: the weight-reading kernel on real shapes, weight bytes / time (the fused
  INT4 GEMV on CUDA; F.linear on the float32 weights the CPU path holds);
- seconds per op: one eager decode step of a deep model of near-zero width (its time is
  all overhead) divided by its op count (model/op_count.py, the planner's counter);
- disk read GB/s (when given a directory): cold reads of a scratch file there, the way the
  disk tier reads shards (runtime/disk_speed.py);
- CPU kernel GB/s: the CPU int4 kernel a one-row bfloat16 step takes (kernels/cpu_gemv.py
  where it builds, else kernels/cpu_int4.py; the gateway chooses) on weights
  larger than the caches, packed weight bytes / time: what CPU-placed parts cost
  (planning/placement.py).
"""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import psutil
import torch

from ..checkpoint.synth import RandomPool, random_components
from ..model.op_count import TINY_WIDTH, count_step_ops, tiny_config
from ..quant.layout import QuantSpec
from ..quant.quantize import QuantizedWeight, dequantize_weight
from ..version import __version__
from .disk_speed import disk_read_bandwidth

logger = logging.getLogger(__name__)
GB = 1e9
SPEC = QuantSpec("int4-asym", 128)  # the default scheme
# (out, in) of the 32B model's linears on CUDA. On CPU the rates depend strongly on whether a
# weight fits the caches (the dequantizer ran at 0.017 GB/s on 2048x5632 and 0.081 GB/s on
# 576x1536 on our 2-core VM), so CPU runs time the shapes a CPU user runs: SmolLM2-135M's.
CUDA_SHAPES = ((5120, 5120), (1024, 5120), (27648, 5120), (5120, 27648))
CPU_SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536))
# The CPU kernel is timed on Llama-3-8B-sized weights: a hybrid run computes big layers there.
CPU_KERNEL_SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))


@dataclass
class CalibrationSizes:
    """How big each measurement is (``quick`` for tests: small and fast, less exact)."""

    copy_bytes: int  # host->device and device copies
    shapes: tuple  # (out, in) weights for the kernel and the CPU slot fill
    layers: int  # depth of the near-zero-width model for the per-op overhead
    steps: int  # decode steps timed for it
    repeats: int  # the best of this many timings
    disk_bytes: int  # scratch file read back for the disk figure

    @staticmethod
    def for_device(device: torch.device, quick: bool) -> CalibrationSizes:
        if quick:
            return CalibrationSizes(8 << 20, ((256, 256), (512, 256)), 4, 4, 3, 8 << 20)
        if device.type == "cuda":
            return CalibrationSizes(1 << 30, CUDA_SHAPES, 32, 16, 7, 1 << 30)
        return CalibrationSizes(256 << 20, CPU_SHAPES, 32, 16, 5, 512 << 20)


@dataclass
class Calibration:
    """What was measured (bytes/s and seconds) and on what."""

    device: str
    device_name: str
    memory_bytes: int
    h2d_bandwidth: float
    device_bandwidth: float
    kernel_bandwidth: float
    op_overhead_s: float
    ops_per_step: int
    step_seconds: float  # of the near-zero-width model
    layers: int
    torch_version: str
    when: str
    disk_read_bandwidth: Optional[float] = None  # bytes/s; None: no --disk-dir measured
    cpu_bandwidth: float = 0.0  # packed bytes/s of the CPU int4 kernel (0: not measured)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls: what the hardware can do. Other work on the
    machine only ever slows a call down (on our shared 2-core VM medians of the same
    measurement varied 6x between runs), so the minimum is the stable figure."""
    fn()  # warm up: allocation, kernel compilation, caches
    fn()
    return min(_timed(fn, device) for _ in range(repeats))


def h2d_bandwidth(device: torch.device, sizes: CalibrationSizes) -> float:
    if device.type == "cuda":
        host = torch.empty(sizes.copy_bytes, dtype=torch.uint8).pin_memory()
        target = torch.empty(sizes.copy_bytes, dtype=torch.uint8, device=device)
        seconds = best_seconds(lambda: target.copy_(host, non_blocking=True), device,
                                 sizes.repeats)
        return sizes.copy_bytes / seconds
    # On CPU a slot fill is what the prefetch worker does: dequantize into the arena.
    weights = _weights(sizes.shapes, torch.device("cpu"))
    slots = [torch.empty(w.out_features, w.in_features) for w in weights]
    packed = sum(w.nbytes for w in weights)
    def fill() -> None:
        for slot, weight in zip(slots, weights, strict=True):
            slot.copy_(dequantize_weight(weight, torch.float32))

    seconds = best_seconds(fill, device, sizes.repeats)
    return packed / seconds


def device_bandwidth(device: torch.device, sizes: CalibrationSizes) -> float:
    source = torch.empty(sizes.copy_bytes, dtype=torch.uint8, device=device).fill_(1)
    target = torch.empty_like(source)
    seconds = best_seconds(lambda: target.copy_(source), device, sizes.repeats)
    return 2 * sizes.copy_bytes / seconds


def kernel_bandwidth(device: torch.device, sizes: CalibrationSizes) -> float:
    """Weight bytes read per second by the decode kernel, one row of input."""
    weights = _weights(sizes.shapes, device)
    if device.type == "cuda":
        from ..kernels.gateway import quantized_linear

        inputs = [torch.randn(1, w.in_features, device=device, dtype=torch.bfloat16)
                  for w in weights]
        nbytes = sum(w.nbytes for w in weights)
        pairs, call = list(zip(inputs, weights, strict=True)), quantized_linear
    else:  # the CPU cache holds float32 matrices and runs F.linear on them
        dense = [dequantize_weight(w, torch.float32) for w in weights]
        inputs = [torch.randn(1, d.shape[1]) for d in dense]
        nbytes = sum(d.numel() * d.element_size() for d in dense)
        pairs, call = list(zip(inputs, dense, strict=True)), torch.nn.functional.linear

    def run() -> None:
        for x, weight in pairs:
            call(x, weight)

    with torch.inference_mode():
        return nbytes / best_seconds(run, device, sizes.repeats)


def cpu_kernel_bandwidth(sizes: CalibrationSizes, quick: bool) -> float:
    """Packed weight bytes per second of the CPU int4 kernel, one bfloat16 row."""
    from ..kernels.gateway import prepare_cpu_weight, quantized_linear

    cpu = torch.device("cpu")
    shapes = sizes.shapes if quick else CPU_KERNEL_SHAPES
    weights = [prepare_cpu_weight(w) for w in _weights(shapes, cpu)]
    inputs = [torch.randn(1, w.in_features, dtype=torch.bfloat16) for w in weights]
    nbytes = sum(w.nbytes for w in weights)

    def run() -> None:
        for x, weight in zip(inputs, weights, strict=True):
            quantized_linear(x, weight)

    with torch.inference_mode():
        return nbytes / best_seconds(run, cpu, sizes.repeats)


def _weights(shapes, device: torch.device) -> List[QuantizedWeight]:
    pool = RandomPool(seed=0, elements=1 << 20)
    weights = []
    for out_features, in_features in shapes:
        parts = random_components(pool, SPEC, out_features, in_features)
        parts = {name: value.to(device) for name, value in parts.items()}
        weights.append(QuantizedWeight.from_parts(parts, SPEC, out_features, in_features))
    return weights


def seconds_per_step(generate: Callable[[int], Callable[[], object]], device: torch.device,
                     steps: int, repeats: int, attempts: int = 4) -> float:
    """Seconds per extra decode step: best timings of 1 and 1 + ``steps`` tokens, taken in
    turn so that both see the same load, and their difference over ``steps``.

    On a busy machine the difference can drown in noise (a CPU CI run measured 0): the
    steps are then doubled, and if it never shows, the long run's time per token, an upper
    bound (it includes the prompt and generate's own setup), is what is reported.
    """
    for _ in range(attempts):
        short, long = generate(1), generate(1 + steps)
        short(), long()  # warm up
        one = many = float("inf")
        for _ in range(repeats):
            one = min(one, _timed(short, device))
            many = min(many, _timed(long, device))
        if many > one:
            return (many - one) / steps
        steps *= 2
    logger.warning("the per-step time was lost in noise (a busy machine?); reporting an upper "
                   "bound, the time per token of a %d-token generation", 1 + steps // 2)
    return many / (1 + steps // 2)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    started = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - started


def op_overhead(device: torch.device, sizes: CalibrationSizes) -> tuple:
    """(seconds per op, ops per step, seconds per step) of a deep near-zero-width model."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    tiny = tiny_config(Qwen2Config(), sizes.layers)
    ops = round(count_step_ops(tiny))
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_config(tiny).to(device=device, dtype=dtype).eval()
    ids = torch.arange(1, 4, device=device).unsqueeze(0)  # (1, 3)

    def generate(new_tokens: int) -> Callable[[], object]:
        return lambda: model.generate(ids, attention_mask=torch.ones_like(ids),
                                      do_sample=False, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, pad_token_id=0,
                                      eos_token_id=None)

    with torch.inference_mode():
        step = seconds_per_step(generate, device, sizes.steps, sizes.repeats)
    logger.info("op overhead: %.3f ms per step of %d ops (width %d, %d layers)", step * 1e3,
                ops, TINY_WIDTH["hidden_size"], sizes.layers)
    return step / ops, ops, step


def calibrate(device: torch.device, quick: bool = False, progress=None,
              disk_dir: Optional[Path] = None) -> Calibration:
    """Run the measurements on ``device`` (and the disk at ``disk_dir``, if given);
    ``progress(label)`` is called after each."""
    sizes = CalibrationSizes.for_device(device, quick)
    done = progress or (lambda label: None)
    h2d = h2d_bandwidth(device, sizes)
    done("host->device")
    memory_bw = device_bandwidth(device, sizes)
    done("device memory")
    kernel_bw = kernel_bandwidth(device, sizes)
    done("kernel")
    per_op, ops, step = op_overhead(device, sizes)
    done("per-op overhead")
    cpu_bw = cpu_kernel_bandwidth(sizes, quick)
    done("CPU int4 kernel")
    disk = None
    if disk_dir is not None:
        disk = disk_read_bandwidth(disk_dir, sizes.disk_bytes, sizes.repeats)
        done("disk reads")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        name, memory = "CPU", psutil.virtual_memory().total
    return Calibration(str(device), name, int(memory), h2d, memory_bw, kernel_bw, per_op, ops,
                       step, sizes.layers, torch.__version__,
                       datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                       disk, cpu_bw)


def _figure(value: float) -> str:
    """A measured figure with 4 significant digits: a fixed 3 decimals wrote a slow but
    positive bandwidth (a loaded machine) as 0.000, which the profile loader refuses."""
    return f"{value:.4g}"


def profile_toml(result: Calibration, name: str, reserve: str) -> str:
    """The profile file: every figure measured here, and says so."""
    cpu = result.device.startswith("cpu")
    h2d_note = ("INT4 -> float32 slot fills by the reference dequantizer (packed bytes/s)"
                if cpu else "pinned host->device copies")
    kernel_note = "F.linear on float32 weights" if cpu else "fused INT4 GEMV, one row"
    source = (f"measured by offload-engine calibrate: {result.step_seconds * 1e3:.3f} ms per "
              f"decode step / {result.ops_per_step} ops (Qwen2 of width "
              f"{TINY_WIDTH['hidden_size']}, {result.layers} layers) on {result.device_name}")
    lines = [
        f"# Written by `offload-engine calibrate` ({result.when}) on {result.device_name}",
        f"# ({result.device}), torch {result.torch_version}. Every figure below was measured",
        "# here except the reserve; rerun calibrate after changing hardware or drivers.",
        f'name = "{name}"',
        f'description = "{result.device_name} (calibrated {result.when})"',
        f'device = "{"cpu" if cpu else "cuda"}"',
        f"memory = {result.memory_bytes}",
        "# large device copy, (read + write) / time",
        f"device_bandwidth_gb_s = {_figure(result.device_bandwidth / GB)}",
        f"# {h2d_note}",
        f"h2d_bandwidth_gb_s = {_figure(result.h2d_bandwidth / GB)}",
        f"# {kernel_note}: weight bytes / time, on real shapes",
        f"kernel_bandwidth_gb_s = {_figure(result.kernel_bandwidth / GB)}",
        f"op_overhead_us = {_figure(result.op_overhead_s * 1e6)}",
        f'op_overhead_source = "{source}"',
        f'reserve = "{reserve}"',
        "# CPU int4 kernel (bfloat16 row), packed weight bytes / time: CPU-placed layer parts",
        f"cpu_bandwidth_gb_s = {result.cpu_bandwidth / GB:.3f}",
        'cpu_bandwidth_source = "measured by offload-engine calibrate"',
    ]
    measured = ["memory", "device_bandwidth_gb_s", "h2d_bandwidth_gb_s",
                "kernel_bandwidth_gb_s", "op_overhead_us", "cpu_bandwidth_gb_s"]
    if result.disk_read_bandwidth is not None:
        lines += ["# cold preadv reads of a scratch file in --disk-dir (disk tier, --host-budget)",
                  f"disk_read_gb_s = {_figure(result.disk_read_bandwidth / GB)}"]
        measured.append("disk_read_gb_s")
    lines += [
        "measured = [" + ", ".join(f'"{key}"' for key in measured) + "]",
        f'calibrated = "offload-engine {__version__} calibrate on {result.device_name}, '
        f'torch {result.torch_version}, {result.when}"',
    ]
    return "\n".join(lines) + "\n"
