"""``offload-engine bench MODEL``: measured speed across budgets, beside the planner's prediction.

The llama-bench of this project: every point is a real run on this device after a
synchronize; the table, bench.csv and bench.json carry every measured field next to the
PREDICTED ones, and ``--plot`` draws tok/s against the budget with the prediction beside
each measured point.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from .options import add_engine_args, engine_config_from_args

DEFAULT_BUDGETS = "min,25%,50%,75%,unbounded"
# (column, row key, format) of the printed table; bench.csv has every field.
TABLE = (("policy", "policy", "{}"), ("budget", "budget", "{}"),
         ("depth", "prefetch_depth", "{}"), ("batch", "batch", "{}"),
         ("MB/token", "h2d_bytes_per_token", "mb"), ("pred MB", "predicted_bytes_per_token", "mb"),
         ("hit", "hit_rate", "{:.1%}"), ("tok/s", "decode_tokens_per_s", "{:.3g}"),
         ("pred tok/s", "predicted_tokens_per_s", "{:.3g}"),
         ("pred ovh ms", "predicted_overhead_ms", "{:.2f}"),
         ("prefill tok/s", "prefill_tokens_per_s", "{:.3g}"),
         ("TTFT s", "time_to_first_token_s", "{:.3f}"), ("H2D GB/s", "h2d_gb_per_s", "{:.3f}"),
         ("stall s", "stall_seconds", "{:.2f}"), ("peak MiB", "peak_device_bytes", "mib"),
         # the CPU side of --placement (runtime/boundary.py), per forward pass
         ("placement", "placement", "{}"), ("CPU MB/token", "cpu_bytes_per_token", "mb"),
         ("CPU ms/token", "cpu_seconds_per_token", "ms"),
         ("CPU GB/s", "cpu_gb_per_s", "{:.2f}"),  # weight bytes the CPU parts read per second
         ("crossings", "crossings_per_token", "{:.0f}"),
         # mixture-of-experts models only (the columns are left out for dense ones)
         ("exp hit", "expert_hit_rate", "{:.1%}"),
         ("exp/token", "experts_fetched_per_token", "{:.2f}"),
         ("exp MB/token", "expert_bytes_per_token", "mb"),
         ("exp pf/token", "experts_prefetched_per_token", "{:.2f}"),
         ("guess ok", "expert_prefetch_accuracy", "{:.1%}"))
# with --compile each point is measured eager and compiled, alternating (decode/bench.py)
COMPILE_TABLE = (("compile", "compile", "{}"), ("warm-up s", "warmup_s", "{:.1f}"),
                 ("runs tok/s", "runs_tokens_per_s", "{}"))


def register(commands) -> None:
    parser = commands.add_parser(
        "bench", help="measure decode speed across budgets, policies and prefetch depths",
        description=__doc__.split("\n\n", 1)[1])
    parser.add_argument("model", type=Path, nargs="?", default=None,
                        help="a quantized or synthetic directory (default: the embedded "
                             "SmolLM2, converted once)")
    parser.add_argument("--budgets", default=DEFAULT_BUDGETS, metavar="LIST",
                        help="comma list of weight budgets: min, N%% or 0.N of all cached "
                             "weight bytes, a size (8GiB), card:PROFILE (what `plan` leaves "
                             "for weights on that card, e.g. card:rtx4060-8gb) or unbounded "
                             f"(default {DEFAULT_BUDGETS.replace('%', '%%')})")
    parser.add_argument("--policies", default="static,lru", metavar="LIST")
    parser.add_argument("--prefetch-depths", default="2", metavar="LIST")
    parser.add_argument("--batch-sizes", default="1", metavar="LIST",
                        help="sequences decoded together, e.g. 1,4,8 (default 1)")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per run")
    parser.add_argument("--prompt", default=None, help="the prompt (default: a fixed sentence)")
    parser.add_argument("--out-dir", type=Path, default=Path("bench-results"))
    parser.add_argument("--plot", action="store_true",
                        help="also draw bench.png (needs matplotlib)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads; on a shared CPU also set OMP_WAIT_POLICY=PASSIVE")
    parser.add_argument("--linear-overhead-calls", type=int, default=0, metavar="N",
                        help="also time OffloadedLinear against nn.Linear, N calls per timing")
    add_engine_args(parser)  # its --hw-profile picks the profile of the predictions
    # --policy/--prefetch-depth, when given, narrow the sweep to that one value
    parser.set_defaults(handler=run, policy=None, prefetch_depth=None)


def run(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from ..decode import bench
    from ..errors import ConfigError
    from ..planning.planner import describe_model
    from ..planning.profiles import load_profile
    from .outputs import check_output

    if args.gpu_budget is not None or args.cache_entries is not None:
        raise ConfigError("bench sweeps the budget itself: use --budgets 8GiB,unbounded")
    if args.tokens < 2:
        raise ConfigError("--tokens must be at least 2 (decode speed needs a second token)")
    check_output(args.out_dir, "--out-dir", directory=True)  # before the sweep, not after
    bench.check_budget_labels(bench.parse_list(args.budgets))
    if args.threads:
        torch.set_num_threads(args.threads)
    policies = [args.policy] if args.policy else bench.parse_list(args.policies)
    depths = ([args.prefetch_depth] if args.prefetch_depth is not None
              else bench.parse_list(args.prefetch_depths, int))
    # each point sets its own policy and depth; these two only satisfy validation
    config = engine_config_from_args(argparse.Namespace(
        **{**vars(args), "policy": policies[0], "prefetch_depth": depths[0]}))
    config.progress, config.hw_profile = False, None
    model = resolve_model(args.model)
    device = config.torch_device()
    profile = load_profile(args.hw_profile or ("cpu" if device.type == "cpu" else "rtx3090"))
    shape = describe_model(model)
    env = bench.environment(device)
    print_header(model, env, profile, device.type == "cpu")
    points = bench.sweep_points(
        shape, profile, config, bench.parse_list(args.budgets), policies, depths,
        bench.parse_list(args.batch_sizes, int))
    prompt = args.prompt or bench.DEFAULT_PROMPT
    rows = []
    for point in tqdm(points, desc="bench", unit="run", disable=args.no_progress):
        measured = (bench.measure_compiled(model, config, point, prompt, args.tokens)
                    if config.compile else [bench.measure(model, config, point, prompt,
                                                          args.tokens)])
        for row in measured:
            context = row["prompt_tokens"] + args.tokens
            rows.append({**vars(point), **row, **cpu_rate(row),
                         **bench.predict(shape, profile, config, point, context)})
    print("\n".join(table(rows)))
    if any(row.get("cpu_gb_per_s") for row in rows):
        env["memory_gb_per_s"] = memory_bandwidth() / 1e9
        print(f"this machine's memory: {env['memory_gb_per_s']:.1f} GB/s (a 256 MiB copy, read "
              "+ write, best of 5): the ceiling for CPU GB/s")
    return finish(args, model, env, profile, rows, config)


def cpu_rate(row: dict) -> dict:
    """Weight bytes per second the CPU-placed parts read (their bytes over their time)."""
    seconds = row.get("cpu_seconds_per_token") or 0.0
    return {"cpu_gb_per_s": row["cpu_bytes_per_token"] / seconds / 1e9} if seconds else {}


def memory_bandwidth() -> float:
    """Bytes/s of a large host memory copy, read + write (calibrate's device figure)."""
    import torch

    from ..runtime.calibrate import CalibrationSizes, device_bandwidth

    cpu = torch.device("cpu")
    return device_bandwidth(cpu, CalibrationSizes.for_device(cpu, quick=False))


def resolve_model(path):
    if path is not None:
        return path
    from ..checkpoint.embedded import ensure_demo_model

    target, summary = ensure_demo_model()
    if summary is not None:
        print("\n".join(summary.lines()))
    return target


def print_header(model, env: dict, profile, cpu: bool) -> None:
    print(f"model {model}")
    print(f"device {env['device']}: {env['device_name']}, torch {env['torch']}, triton "
          f"{env['triton']}, {env['threads']} threads, offload-engine {env['offload_engine']} "
          f"commit {env['commit']}")
    if cpu:
        print("these are CPU timings: bytes per token and hit rate carry over to a GPU, "
              "tokens/s and stall time do not")
    print(f"predictions (PREDICTED columns): planner with hardware profile {profile.name!r}")


def table(rows: list) -> list:
    """The printed table: measured and PREDICTED columns side by side."""
    def cell(value, fmt: str) -> str:
        if value is None:
            return "n/a"
        if fmt == "mb":
            return f"{value / 1e6:.2f}"
        if fmt == "mib":
            return f"{value / 2**20:.0f}"
        if fmt == "ms":
            return f"{value * 1e3:.2f}"
        return fmt.format(value)

    moe = any(row.get("experts_fetched_per_token") or row.get("expert_hit_rate")
              for row in rows)  # every row carries the fields; a dense model's are 0
    columns = [c for c in TABLE if moe or not c[1].startswith("expert")]
    columns += COMPILE_TABLE if any("compile" in row for row in rows) else ()
    cells = [[cell(row.get(key), fmt) for _, key, fmt in columns] for row in rows]
    widths = [max([len(name)] + [len(c[i]) for c in cells]) for i, (name, _, _) in
              enumerate(columns)]
    lines = ["  ".join(name.rjust(w) for (name, _, _), w in zip(columns, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in cells]
    return lines


def finish(args, model, env: dict, profile, rows: list, config) -> int:
    """Write bench.csv/json (and the plot); exit 1 if greedy tokens differed at batch 1."""
    from ..runtime.linear_timing import linear_overhead

    device = config.torch_device()
    outputs = {row["token_ids"] for row in rows if "token_ids" in row}
    identical = len(outputs) <= 1
    print(f"greedy tokens identical across every budget, policy and depth: {identical}")
    overhead = []
    if args.linear_overhead_calls > 0:
        overhead = linear_overhead(args.linear_overhead_calls, device, config.torch_dtype())
    for item in overhead:
        print(f"Linear {item['in_features']}x{item['out_features']}, 1 row: nn.Linear "
              f"{item['nn_linear_us']:.1f} us, OffloadedLinear (resident) "
              f"{item['offloaded_linear_us']:.1f} us per call: {item['overhead_us']:+.1f} us")
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with (out / "bench.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    summary = {"model": str(model), **env, "cpu_run": device.type == "cpu",
               "profile": profile.name, "profile_source": profile.source,
               "tokens": args.tokens, "identical_outputs": identical,
               "linear_overhead": overhead, "rows": rows, "command": sys.argv}
    (out / "bench.json").write_text(json.dumps(summary, indent=1))
    written = [out / "bench.csv", out / "bench.json"]
    if args.plot:
        from .bench_plot import plot

        title = (f"{Path(model).name} on {env['device_name']}"
                 + (" (CPU timings)" if device.type == "cpu" else "")
                 + f"; hollow = PREDICTED with profile {profile.name}")
        if plot(rows, out / "bench.png", title):
            written.append(out / "bench.png")
    print(f"wrote {', '.join(map(str, written))}")
    return 0 if identical else 1
