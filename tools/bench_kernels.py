"""Check and time the quantized-linear kernels.

  python tools/bench_kernels.py --check   every Triton path against the reference, on
                                          whatever device is here (the CPU interpreter
                                          without a GPU); exits 1 on a mismatch
  python tools/bench_kernels.py           timings on a GPU for the 32B model's shapes
  python tools/bench_kernels.py --bytes   computed (not measured) bytes per decode step
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
from dataclasses import dataclass

# The 32B model (Qwen2.5-32B): per-layer linears as (name, out N, in K), and the lm_head.
LAYERS_32B = 64
LINEARS_32B = (
    ("q_proj", 5120, 5120),
    ("k_proj", 1024, 5120),
    ("v_proj", 1024, 5120),
    ("o_proj", 5120, 5120),
    ("gate_proj", 27648, 5120),
    ("up_proj", 27648, 5120),
    ("down_proj", 5120, 27648),
)
LM_HEAD_32B = ("lm_head", 152064, 5120)
TIMING_SHAPES = ((5120, 5120), (1024, 5120), (27648, 5120), (5120, 27648), (152064, 5120))
TIMING_ROWS = (1, 4, 16, 256)
ACT_BYTES = 2  # bf16 activations
L2_FLUSH_BYTES = 256 << 20  # overwritten before each timed call (larger than any L2 cache)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="compare every kernel with the reference and exit 1 on a mismatch")
    mode.add_argument("--bytes", action="store_true",
                      help="print computed bytes moved per decode step for the 32B model")
    parser.add_argument("--csv", metavar="PATH", help="also write the timing table to PATH")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls per case")
    parser.add_argument("--iters", type=int, default=30, help="timed calls per case (median)")
    parser.add_argument("--bandwidth-gbs", type=float, default=936.0,
                        help="memory bandwidth for the --bytes time floor (default: RTX 3090)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- --bytes (computed)

def decode_bytes(n_out: int, k_in: int) -> tuple:
    """(fused, dequant-then-matmul) bytes for one bf16 row through an int4 g128 linear."""
    from offload_engine.quant.layout import QuantSpec

    quantized = QuantSpec("int4", 128).nbytes(n_out, k_in)  # packed codes + bf16 scales
    activations = (k_in + n_out) * ACT_BYTES  # read x, write y
    dense = n_out * k_in * ACT_BYTES  # the bf16 weight, written once and read back once
    return quantized + activations, quantized + 2 * dense + activations


def print_bytes(bandwidth_gbs: float) -> None:
    rows = [(name, n, k, LAYERS_32B) for name, n, k in LINEARS_32B] + [(*LM_HEAD_32B, 1)]
    print("COMPUTED (not measured) bytes moved per decode step, M=1, bf16 activations,")
    print("32B model (Qwen2.5-32B shapes), int4 symmetric, group 128, bf16 scales.")
    print("fused = packed codes + scales read once, x read, y written;")
    print("dequant+matmul = packed codes + scales read, bf16 weight written and read back,")
    print("x read, y written. Biases, norms, attention and the KV cache are not counted.\n")
    header = f"{'linear':<10}{'N x K':>14}{'count':>7}{'fused MB':>12}{'dequant MB':>13}"
    print(header)
    print("-" * len(header))
    total_fused = total_dequant = 0
    for name, n_out, k_in, count in rows:
        fused, dequant = decode_bytes(n_out, k_in)
        total_fused += fused * count
        total_dequant += dequant * count
        print(f"{name:<10}{f'{n_out}x{k_in}':>14}{count:>7}{fused * count / 1e6:>12.1f}"
              f"{dequant * count / 1e6:>13.1f}")
    print("-" * len(header))
    print(f"{'total':<10}{'':>14}{'':>7}{total_fused / 1e6:>12.1f}{total_dequant / 1e6:>13.1f}")
    print(f"\nper decode step: fused {total_fused / 1e9:.2f} GB, "
          f"dequant+matmul {total_dequant / 1e9:.2f} GB "
          f"({total_dequant / total_fused:.1f}x more traffic)")
    print(f"time floor at {bandwidth_gbs:.0f} GB/s (computed): fused "
          f"{total_fused / bandwidth_gbs / 1e6:.1f} ms/token, dequant+matmul "
          f"{total_dequant / bandwidth_gbs / 1e6:.1f} ms/token")


# ---------------------------------------------------------------- --check

def check_cases(on_gpu: bool) -> list:
    import torch

    from offload_engine.kernels import gateway
    from offload_engine.kernels.selfcheck import Case

    if on_gpu:
        shapes = ((5120, 5120), (1000, 4000), (1024, 576), (333, 27648))
        gemv_rows, matmul_rows = (1, 4, 16), (17, 256)
    else:  # the interpreter pays about a millisecond per program: small shapes
        shapes = ((200, 576), (70, 301))
        gemv_rows, matmul_rows = (1, 3, 16), (17, 64)
    cases = []
    for scheme in ("int4", "int4-asym", "int8"):
        for group in (32, 64, 128, 256):
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                for n_out, k_in in shapes:
                    cases += [Case(gateway.TRITON_GEMV, scheme, group, n_out, k_in, m, dtype)
                              for m in gemv_rows]
                    cases += [Case(gateway.TRITON_DEQUANT_MATMUL, scheme, group, n_out, k_in,
                                   m, dtype) for m in matmul_rows]
    return cases + raw_block_cases(on_gpu, gemv_rows, matmul_rows)


def raw_block_cases(on_gpu: bool, gemv_rows, matmul_rows) -> list:
    """GGUF blocks held as they are (Q4_K, Q5_K, Q6_K, Q5_0, Q5_1): rows of whole blocks."""
    import torch

    from offload_engine.kernels import gateway
    from offload_engine.kernels.selfcheck import Case
    from offload_engine.quant.block_formats import FORMATS

    cases = []
    for scheme, fmt in FORMATS.items():
        blocks = (20, 108) if on_gpu else (3,)  # 108 super-blocks: a 27648-wide down_proj
        for n_out in ((5120, 333) if on_gpu else (70,)):
            for k_in in (b * fmt.block_elements for b in blocks):
                for dtype in (torch.bfloat16, torch.float16):
                    cases += [Case(path, scheme, fmt.block_elements, n_out, k_in, m, dtype,
                                   scale_dtype="fp16")
                              for path, rows in ((gateway.TRITON_GEMV, gemv_rows),
                                                 (gateway.TRITON_DEQUANT_MATMUL, matmul_rows))
                              for m in rows]
    return cases


def run_check(on_gpu: bool) -> int:
    import torch

    from offload_engine.kernels.selfcheck import run_case

    device = torch.device("cuda" if on_gpu else "cpu")
    where = torch.cuda.get_device_name(device) if on_gpu else "CPU (Triton interpreter)"
    print(f"kernel self-check on {where}")
    print(f"{'case':<72}{'max|err|':>10}{'tol':>10}{'err/tol':>9}")
    results = []
    for seed, case in enumerate(check_cases(on_gpu)):
        result = run_case(case, device, seed=seed)
        results.append(result)
        flag = "" if result.ok else "  MISMATCH"
        print(f"{case.label:<72}{result.max_abs_err:>10.3g}{result.tolerance:>10.3g}"
              f"{result.worst_ratio:>9.3f}{flag}")
    worst = max(results, key=lambda r: r.worst_ratio)
    bad = [r for r in results if not r.ok]
    print(f"\n{len(results)} cases, {len(bad)} mismatches; worst err/tol {worst.worst_ratio:.3f} "
          f"(max|err| {worst.max_abs_err:.3g}) in {worst.case.label}")
    return 1 if bad else 0


# ---------------------------------------------------------------- timings (GPU)

@dataclass
class Timing:
    n_out: int
    k_in: int
    rows: int
    path: str
    kernel_ms: float
    baseline_ms: float  # reference dequantize-to-bf16 + matmul; nan if it ran out of memory
    bytes_read: int
    gbs: float
    pct_copy: float


def random_weight(n_out: int, k_in: int, device):
    """An int4 g128 weight with random codes (timing does not depend on the values)."""
    import torch

    from offload_engine.quant.layout import QuantSpec
    from offload_engine.quant.quantize import QuantizedWeight

    spec = QuantSpec("int4", 128)
    shapes = spec.component_shapes(n_out, k_in)
    qweight = torch.randint(0, 256, shapes["qweight"][0], dtype=torch.uint8, device=device)
    scales = (torch.rand(shapes["scales"][0], device=device) * 0.02).to(torch.bfloat16)
    return QuantizedWeight(qweight, scales, None, spec, n_out, k_in)


def median_ms(fn, warmup: int, iters: int, flush=None) -> float:
    """Median CUDA-event time of fn(). With ``flush`` (a large tensor) the L2 cache is
    overwritten before every call, so weights are read from memory, as in a real decode
    step; the flush also keeps the GPU busy while the next launch is queued."""
    import torch

    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(iters)]
    for start, stop in events:
        if flush is not None:
            flush.zero_()
        start.record()
        fn()
        stop.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(stop) for start, stop in events)


def copy_bandwidth_gbs(device) -> float:
    """Device-to-device copy of 1 GiB: (read + write) bytes / median time."""
    import torch

    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), warmup=3, iters=10)
    return 2 * (1 << 30) / ms / 1e6


def time_case(n_out, k_in, rows, copy_gbs, args) -> Timing:
    import torch

    from offload_engine.kernels import gateway

    device = torch.device("cuda")
    weight = random_weight(n_out, k_in, device)
    x = torch.randn(rows, k_in, device=device, dtype=torch.bfloat16)
    path = gateway.kernel_path(x, weight)
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    kernel_ms = median_ms(lambda: gateway.run_path(path, x, weight), args.warmup, args.iters,
                          flush)
    try:
        baseline_ms = median_ms(lambda: gateway.run_path(gateway.REFERENCE, x, weight),
                                min(args.warmup, 2), min(args.iters, 10), flush)
    except torch.cuda.OutOfMemoryError:
        baseline_ms = float("nan")
    torch.cuda.empty_cache()
    moved = weight.nbytes + (rows * k_in + rows * n_out) * ACT_BYTES
    gbs = moved / kernel_ms / 1e6
    return Timing(n_out, k_in, rows, path, kernel_ms, baseline_ms, moved, gbs,
                  100 * gbs / copy_gbs)


def run_timing(args) -> int:
    import torch

    from offload_engine.kernels import triton_dequant

    device = torch.device("cuda")
    print(f"GPU: {torch.cuda.get_device_name(device)}")
    copy_gbs = copy_bandwidth_gbs(device)
    print(f"measured device copy bandwidth (read + write): {copy_gbs:.0f} GB/s")
    print("int4 g128 weights, bf16 activations; GB/s = (packed + scales + x + y) / time; "
          "baseline = reference dequantize-to-bf16 then torch.matmul\n")
    print(f"{'N x K':>13}{'M':>5}  {'path':<22}{'kernel ms':>10}{'GB/s':>8}{'% copy':>8}"
          f"{'baseline ms':>12}{'speedup':>9}")
    timings = []
    for n_out, k_in in TIMING_SHAPES:
        for rows in TIMING_ROWS:
            t = time_case(n_out, k_in, rows, copy_gbs, args)
            timings.append(t)
            print(f"{f'{n_out}x{k_in}':>13}{rows:>5}  {t.path:<22}{t.kernel_ms:>10.4f}"
                  f"{t.gbs:>8.0f}{t.pct_copy:>7.0f}%{t.baseline_ms:>12.4f}"
                  f"{t.baseline_ms / t.kernel_ms:>8.1f}x")
        triton_dequant.clear_scratch()
    if args.csv:
        write_csv(args.csv, timings, torch.cuda.get_device_name(device), copy_gbs)
        print(f"\nwrote {args.csv}")
    return 0


def write_csv(path: str, timings: list, gpu: str, copy_gbs: float) -> None:
    fields = list(Timing.__dataclass_fields__)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["gpu", "copy_gbs", *fields])
        for t in timings:
            values = (getattr(t, f) for f in fields)
            writer.writerow([gpu, f"{copy_gbs:.1f}",
                             *(f"{v:.6g}" if isinstance(v, float) else v for v in values)])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.bytes:
        print_bytes(args.bandwidth_gbs)
        return 0
    import torch  # torch does not import triton; the kernels are imported later, lazily

    on_gpu = torch.cuda.is_available()
    if args.check:
        if not on_gpu:  # must be set before triton defines the kernels
            os.environ["TRITON_INTERPRET"] = "1"
        return run_check(on_gpu)
    if not on_gpu:
        print("kernel timings need a CUDA GPU; none found. On CPU use --check (correctness "
              "under the Triton interpreter) or --bytes (computed traffic per decode step).")
        return 0
    return run_timing(args)


if __name__ == "__main__":
    sys.exit(main())
