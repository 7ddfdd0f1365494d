"""Sweep the host budget (--host-budget) on a real model: disk traffic, speed, peak memory.

  python tools/disk_tier_table.py                       the embedded SmolLM2 (converted once)
  python tools/disk_tier_table.py DIR --host-budgets min,50%,unbounded --tokens 8

Each budget runs in its own process (so its peak RSS is its own): load the engine,
warm up with one token, generate --tokens greedy tokens, and report the host plan
(weights kept in RAM, bytes read from disk per token as planned), the measured bytes
read from disk per token, the disk reader's GB/s, decode tokens/s, the compute's and
the prefetch worker's stall time, the time the disk reader spent checking each read's
CRC-32 per token, and the process's peak RSS growth over a baseline
taken after every import. Percentages are of the INT4 bytes the device cache streams.
It prints a Markdown table and checks that every budget produced the same tokens.
Shard pages are dropped from the page cache after each read, so a bounded run reads
the disk, not RAM; on a CPU every timing is a CPU timing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from offload_engine.cli.demo_cmd import DEFAULT_DEMO_BUDGET
from offload_engine.units import parse_bytes

DEFAULT_BUDGETS = "min,25%,50%,unbounded"
DEFAULT_PROMPT = "The three most important ideas in computer science are"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path, default=None,
                        help="a quantized directory (default: the embedded SmolLM2)")
    parser.add_argument("--host-budgets", default=DEFAULT_BUDGETS,
                        help="comma list: min, N%% of the streamed INT4 bytes, a size (32MiB) "
                             f"or unbounded (default {DEFAULT_BUDGETS})")
    parser.add_argument("--gpu-budget", default=DEFAULT_DEMO_BUDGET,
                        help="the device arena (on a CPU: RAM too); default "
                             f"{DEFAULT_DEMO_BUDGET}, as the demo")
    parser.add_argument("--tokens", type=int, default=8, help="new tokens per run (default 8)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process mode
    return parser.parse_args(argv)


def resolve_model(path) -> Path:
    if path is not None:
        return path
    from offload_engine.checkpoint.embedded import ensure_demo_model

    target, summary = ensure_demo_model()
    if summary is not None:
        print("\n".join(summary.lines()), file=sys.stderr)
    return target


def budget_points(text: str, model: Path, gpu_budget: str) -> list:
    """[(label, bytes or 'unbounded')] from the plan of this model at this device budget."""
    from offload_engine.planning.planner import PlanRequest, describe_model, make_plan
    from offload_engine.planning.profiles import load_profile

    plan = make_plan(describe_model(model), PlanRequest(
        load_profile("cpu"), gpu_budget=gpu_budget, host_budget="1TB", context=256))
    streamed, minimum = plan.cache.streamed_bytes, plan.host["minimum_budget"]
    points = []
    for item in (part.strip().lower() for part in text.split(",") if part.strip()):
        if item == "unbounded":
            value = "unbounded"
        elif item == "min":
            value = minimum
        elif item.endswith("%"):
            value = max(minimum, int(float(item[:-1]) / 100 * streamed))
        else:
            value = max(minimum, parse_bytes(item))
        points.append((item, value))
    return points


def run_one(args) -> dict:
    """Child process: one budget, measured."""
    import resource

    import psutil
    import torch

    from offload_engine.decode.api import load

    if args.threads:
        torch.set_num_threads(args.threads)
    budget = args.one if args.one == "unbounded" else int(args.one)
    with load(args.model, progress=False, gpu_budget=args.gpu_budget, host_budget=budget) as e:
        e.generate(args.prompt, max_new_tokens=1, greedy=True)  # imports, first fill
        baseline = psutil.Process().memory_info().rss  # after every import, with the model
        checked = e.counters().get("disk_verify_seconds", 0.0)
        # The peak over the baseline while generating; the load's own peak is counted too.
        result = e.generate(args.prompt, max_new_tokens=args.tokens, greedy=True)
        checked = e.counters().get("disk_verify_seconds", 0.0) - checked
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        stats, host = result.stats, e.host_plan
        return {"host_ram_bytes": e.store.nbytes, "weights_on_disk": len(host.on_disk),
                "weights": len(e.cache.order), "planned_disk_bytes": host.disk_bytes_per_pass,
                "disk_bytes_per_token": stats.disk_bytes_per_token,
                "disk_gb_s": stats.disk_read_bytes_per_s / 1e9,
                "tokens_per_s": stats.decode_tokens_per_s, "stall_s": stats.stall_seconds,
                "disk_stall_s": stats.disk_stall_seconds, "rss_bytes": baseline,
                "crc_ms_per_token": 1e3 * checked / max(stats.forward_passes, 1),
                "peak_rss_bytes": peak, "token_ids": result.token_ids}


def table(rows: list) -> list:
    lines = ["| host budget | INT4 in RAM | weights read from disk | disk MB/token (plan) | "
             "disk GB/s | CRC ms/token | decode tok/s | stall s (disk) | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, value, r in rows:
        shown = "unbounded" if value == "unbounded" else f"{label} = {value / 2**20:.1f} MiB"
        lines.append(
            f"| {shown} | {r['host_ram_bytes'] / 2**20:.1f} MiB | {r['weights_on_disk']} of "
            f"{r['weights']} | {r['disk_bytes_per_token'] / 1e6:.2f} "
            f"({r['planned_disk_bytes'] / 1e6:.2f}) | {r['disk_gb_s']:.2f} | "
            f"{r['crc_ms_per_token']:.2f} | "
            f"{r['tokens_per_s']:.2f} | {r['stall_s']:.2f} ({r['disk_stall_s']:.2f}) | "
            f"{r['peak_rss_bytes'] / 1e6:.0f} |")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one is not None:
        print(json.dumps(run_one(args)))
        return 0
    model = resolve_model(args.model)
    rows = []
    for label, value in budget_points(args.host_budgets, model, args.gpu_budget):
        command = [sys.executable, __file__, str(model), "--one", str(value),
                   "--gpu-budget", args.gpu_budget, "--tokens", str(args.tokens),
                   "--prompt", args.prompt] + (["--threads", str(args.threads)]
                                               if args.threads else [])
        # glibc's default mmap threshold keeps freed temporaries in the heap; a fixed one
        # makes the peak RSS the engine's (see tests/test_disk_tier.py).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        run = subprocess.run(command, capture_output=True, text=True, env=env)
        if run.returncode != 0:
            print(run.stderr[-3000:], file=sys.stderr)
            return run.returncode
        rows.append((label, value, json.loads(run.stdout.strip().splitlines()[-1])))
        print(table(rows)[-1], file=sys.stderr, flush=True)
    print("\n".join(table(rows)))
    same = len({tuple(r["token_ids"]) for _, _, r in rows}) == 1
    print(f"\ngreedy tokens identical across budgets: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
