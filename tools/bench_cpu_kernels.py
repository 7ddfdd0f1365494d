"""Time the CPU paths of a quantized linear, and the machine's memory bandwidth beside them.

  python tools/bench_cpu_kernels.py                   SmolLM2-135M and Llama-3-8B shapes
  python tools/bench_cpu_kernels.py --shapes 4096x4096 --rows 1 16 --scheme int4-asym

Paths, all through offload_engine.kernels:
  reference    dequantize to the activation dtype every call, then F.linear (float32 x)
  dense-fp32   F.linear on the float32 weight held dequantized (--cache-format dequantized,
               the CPU default with --dtype float32): 4 bytes per weight read
  cpu-int4pack torch's packed int4 kernel on the prepacked weight, bfloat16 x
               (--cache-format prepacked, the CPU default with --dtype bfloat16)
  cpu-gemv     our C++ kernel (kernels/cpu_gemv.py) on the stored components, bfloat16 x,
               at most 4 rows (built on first use; skipped if it cannot be built)

The paths of one shape are timed in turn, call after call (so load on a shared machine
hits them alike); "ms" is the median of --iters calls after --warmup and "best ms" the
fastest of them; "weight GB/s" (from the median) is the bytes the
path reads for the weight (int4 codes + scales for the packed paths, 4 bytes per weight
for dense-fp32) divided by that time. "memory GB/s" is a large tensor copy, (read + write)
bytes / time: the ceiling a weight-reading kernel could reach. A CPU shared with other
work gives noisy figures; run it more than once.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from offload_engine.kernels import cpu_gemv, gateway
from offload_engine.quant.layout import QuantSpec
from offload_engine.quant.quantize import dequantize_weight, quantize_weight

SMOLLM2_SHAPES = ("576x576", "192x576", "1536x576", "576x1536", "49152x576")
LLAMA3_8B_SHAPES = ("4096x4096", "1024x4096", "14336x4096", "4096x14336")
COPY_BYTES = 256 << 20


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=SMOLLM2_SHAPES + LLAMA3_8B_SHAPES,
                        metavar="NxK", help="weights as out x in (default: SmolLM2-135M's and "
                                            "Llama-3-8B's linears)")
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 16, 128],
                        help="rows of x: 1-16 decode, more is prefill (default 1 16 128)")
    parser.add_argument("--scheme", default="int4-min", help="int4, int4-asym, int4-min")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--scale-dtype", default="fp16", help="bf16 or fp16 (GGUF imports)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--skip-reference", action="store_true",
                        help="do not time the (slow) dequantize-per-call reference")
    return parser.parse_args(argv)


def median_ms(fn, warmup: int, iters: int) -> float:
    return alternating_ms([fn], warmup, iters)[0][0]


def alternating_ms(fns, warmup: int, iters: int) -> list:
    """(median ms, best ms) of each function, timed one call of each in turn."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(iters):
        for fn, spent in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [(statistics.median(t) * 1e3, min(t) * 1e3) for t in times]


def memory_gbs(warmup: int, iters: int) -> float:
    src = torch.ones(COPY_BYTES, dtype=torch.uint8)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), warmup, iters)
    return 2 * COPY_BYTES / ms / 1e6


def weight_for(spec: QuantSpec, n_out: int, k_in: int):
    gen = torch.Generator().manual_seed(n_out * 7 + k_in)
    return quantize_weight(torch.randn(n_out, k_in, generator=gen) * 0.02, spec)


def bench_shape(spec: QuantSpec, n_out: int, k_in: int, rows: int, args) -> list:
    weight = weight_for(spec, n_out, k_in)
    prepared = gateway.prepare_cpu_weight(weight)
    dense = dequantize_weight(weight, torch.float32)
    x32 = torch.randn(rows, k_in)
    x16 = x32.to(torch.bfloat16)
    packed_bytes = weight.nbytes
    cases = [("dense-fp32", lambda: F.linear(x32, dense), dense.numel() * 4)]
    if gateway.kernel_path(x16, prepared) in (gateway.CPU_INT4PACK, gateway.CPU_GEMV):
        cases.append(("cpu-int4pack",
                      lambda: gateway.run_path(gateway.CPU_INT4PACK, x16, prepared),
                      packed_bytes))
    if rows <= cpu_gemv.MAX_ROWS and cpu_gemv.accepts(x16, weight):
        cases.append(("cpu-gemv", lambda: gateway.run_path(gateway.CPU_GEMV, x16, weight),
                      packed_bytes))
    if not args.skip_reference:
        cases.append(("reference", lambda: gateway.run_path(gateway.REFERENCE, x32, weight),
                      packed_bytes))
    timings = alternating_ms([fn for _, fn, _ in cases], args.warmup, args.iters)
    return [(f"{n_out}x{k_in}", rows, name, ms, best, nbytes / ms / 1e6)
            for (name, _, nbytes), (ms, best) in zip(cases, timings, strict=True)]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = QuantSpec(args.scheme, args.group_size, args.scale_dtype)
    print(f"CPU quantized-linear timings, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.scheme} g{args.group_size} "
          f"{args.scale_dtype} scales (measured on this machine)")
    print(f"memory GB/s (copy of {COPY_BYTES >> 20} MiB, read + write): "
          f"{memory_gbs(args.warmup, args.iters):.1f}")
    print(f"load average {os.getloadavg()[0]:.2f}")
    header = f"{'N x K':>12}{'rows':>6}  {'path':<14}{'ms':>10}{'best ms':>10}{'weight GB/s':>13}"
    print(header)
    print("-" * len(header))
    for shape in args.shapes:
        n_out, k_in = (int(v) for v in shape.lower().split("x"))
        for rows in args.rows:
            for label, m, name, ms, best, gbs in bench_shape(spec, n_out, k_in, rows, args):
                print(f"{label:>12}{m:>6}  {name:<14}{ms:>10.3f}{best:>10.3f}{gbs:>13.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
