"""Write summary.md for a folder made by tools/gpu_report.sh: every figure beside its prediction.

  python tools/gpu_report_summary.py REPORT_DIR [--reference-profile rtx3090]

Reads bench/bench.json, profile.toml (from `offload-engine calibrate`), and the text
outputs of the test and kernel steps; only the standard library and offload_engine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from offload_engine.errors import OffloadError
from offload_engine.planning.profiles import load_profile

STEP_FILES = (("CUDA tests (`pytest -m cuda`)", "pytest-cuda.txt"),
              ("kernel check (`tools/bench_kernels.py --check`)", "kernels-check.txt"),
              ("kernel timings (`tools/bench_kernels.py`)", "kernels.txt"),
              ("synthetic model (`offload-engine synth`)", "synth.txt"))


def profile_rows(measured, reference) -> list:
    """Markdown rows: each calibrated figure beside the shipped profile's figure."""
    def us(p):
        return f"{p.op_overhead_s * 1e6:.2f} us"

    def gbs(value):
        return f"{value / 1e9:.2f} GB/s" if value else "not set"

    return [
        "| figure | measured here (calibrate) | shipped profile "
        f"`{reference.name}` (spec or ESTIMATE) |",
        "|---|---|---|",
        f"| host->device | {gbs(measured.h2d_bandwidth)} | {gbs(reference.h2d_bandwidth)} |",
        f"| device memory (copy) | {gbs(measured.device_bandwidth)} | "
        f"{gbs(reference.device_bandwidth)} |",
        f"| decode kernel (weight bytes) | {gbs(measured.kernel_bandwidth)} | "
        f"{gbs(reference.kernel_bandwidth)} |",
        f"| per-op overhead | {us(measured)} | {us(reference)} |",
    ]


def bench_rows(bench: dict) -> list:
    """Markdown rows: each measured point beside the PREDICTION for the same settings."""
    def mb(value):
        return f"{value / 1e6:.4g}" if value is not None else "n/a"

    lines = ["| budget | policy | batch | tok/s | PREDICTED tok/s | PREDICTED op overhead ms "
             "| MB/token | PREDICTED MB/token | hit rate | TTFT s | prefill tok/s | "
             "H2D GB/s | stall s | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in bench["rows"]:
        peak = row.get("peak_device_bytes")
        peak_text = f"{peak / 2**30:.2f}" if peak is not None else "n/a on CPU"
        lines.append(
            f"| {row['budget']} | {row['policy']} | {row['batch']} | "
            f"{row['decode_tokens_per_s']:.3g} | {row['predicted_tokens_per_s']:.3g} | "
            f"{row['predicted_overhead_ms']:.2f} | {mb(row['h2d_bytes_per_token'])} | "
            f"{mb(row['predicted_bytes_per_token'])} | {row['hit_rate']:.1%} | "
            f"{row['time_to_first_token_s']:.3f} | {row['prefill_tokens_per_s']:.3g} | "
            f"{row['h2d_gb_per_s']:.2f} | {row['stall_seconds']:.2f} | {peak_text} |")
    return lines


def step_lines(folder: Path) -> list:
    """The last line of each step's output (its verdict), or that the step did not run."""
    lines = []
    for label, name in STEP_FILES:
        path = folder / name
        if not path.is_file():
            lines.append(f"- {label}: not run")
            continue
        text = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        lines.append(f"- {label}: `{text[-1].strip() if text else '(no output)'}` ({name})")
    return lines


def summarise(folder: Path, reference: str) -> str:
    bench = json.loads((folder / "bench" / "bench.json").read_text())
    measured = load_profile(folder / "profile.toml")
    shipped = load_profile(reference)
    cpu = " (a CPU run: timings are CPU timings)" if bench.get("cpu_run") else ""
    lines = [
        "# offload-engine GPU report",
        "",
        f"- device: {bench['device']} {bench['device_name']}{cpu}",
        f"- torch {bench['torch']}, triton {bench['triton']}, offload-engine "
        f"{bench['offload_engine']}, commit {bench['commit']}",
        f"- model: {bench['model']}, {bench['tokens']} greedy tokens per run; greedy tokens "
        f"identical across budgets: {bench['identical_outputs']}",
        f"- predictions: the planner with the profile calibrated here (`{measured.source}`)",
        "",
        "## Steps",
        *step_lines(folder),
        "",
        "## Hardware figures",
        *profile_rows(measured, shipped),
        "",
        "## Decode across budgets: measured beside PREDICTED",
        *bench_rows(bench),
        "",
        "Every PREDICTED figure is the planner's, from the calibrated profile; tok/s, TTFT, "
        "GB/s, stall and peak memory were measured after a device synchronize.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--reference-profile", default="rtx3090",
                        help="shipped profile to set the measured figures beside")
    args = parser.parse_args(argv)
    try:
        text = summarise(args.folder, args.reference_profile)
    except (OSError, KeyError, ValueError, OffloadError) as exc:
        print(f"gpu_report_summary: error: {args.folder}: {exc}", file=sys.stderr)
        return 2
    (args.folder / "summary.md").write_text(text)
    print(f"wrote {args.folder / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
