"""Sweep the weight budget and the cache policy on a real model: measured beside predicted.

  python tools/bench.py                         the embedded SmolLM2 (converted once)
  python tools/bench.py DIR --budgets min,50%,unbounded --tokens 4 --out-dir results/

For every policy and budget it loads the real engine, generates --tokens greedy
tokens from a fixed prompt and records host->device bytes per token, hit rate,
decode tokens/s and stall time, next to the planner's PREDICTION for the same
settings. It writes bench.csv, bench.json and bench.png (matplotlib optional) into
--out-dir. It also times the cache-backed Linear against a plain nn.Linear on tiny
shapes: at 50 tokens/s a 32B model makes ~22,000 linear calls per second, so
microseconds per call matter. On a CPU every timing is a CPU timing.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from offload_engine.cli.options import add_engine_args, engine_config_from_args
from offload_engine.decode.api import load
from offload_engine.errors import OffloadError
from offload_engine.planning.planner import PlanRequest, describe_model, make_plan
from offload_engine.planning.policy import POLICIES
from offload_engine.planning.profiles import load_profile
from offload_engine.runtime.engine import device_name
from offload_engine.units import parse_bytes

DEFAULT_BUDGETS = "min,25%,50%,75%,unbounded"
DEFAULT_PROMPT = "The three most important ideas in computer science are"
OVERHEAD_SHAPES = ((64, 64), (256, 256), (512, 512))  # (in, out): tiny, so overhead shows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path, default=None,
                        help="a quantized directory (default: the embedded SmolLM2, converted "
                             "once into the demo cache)")
    parser.add_argument("--budgets", default=DEFAULT_BUDGETS,
                        help="comma list: min, N%% of all cached weight bytes, a size (24MiB) "
                             f"or unbounded (default {DEFAULT_BUDGETS})")
    parser.add_argument("--tokens", type=int, default=16,
                        help="new tokens per run (default 16)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--out-dir", type=Path, default=Path("bench-results"))
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads (default: torch's choice); on a shared machine "
                             "also set OMP_WAIT_POLICY=PASSIVE, see docs/performance.md")
    parser.add_argument("--overhead-calls", type=int, default=2000, metavar="N",
                        help="calls per timing of the Linear overhead test (0 skips it)")
    add_engine_args(parser)  # its --hw-profile picks the profile for the predictions here
    # (default: cpu on a CPU, else rtx3090); --policy limits the sweep to one policy.
    parser.set_defaults(policy=None)
    args = parser.parse_args(argv)
    if args.gpu_budget is not None or args.cache_entries is not None:
        parser.error("bench sweeps the budget itself: use --budgets")
    if args.tokens < 1:
        parser.error("--tokens must be at least 1")
    return args


def resolve_model(path) -> Path:
    """The model to bench; the embedded SmolLM2 is converted on first use."""
    if path is not None:
        return path
    from offload_engine.checkpoint.embedded import ensure_demo_model

    target, summary = ensure_demo_model()
    if summary is not None:
        print("\n".join(summary.lines()))
    return target


def budget_points(text: str, floor_plan) -> list:
    """[(label, bytes or None)] for one policy; nothing below that policy's minimum."""
    total, minimum = floor_plan.cache.total_bytes, floor_plan.minimum_budget
    points = []
    for item in (part.strip().lower() for part in text.split(",") if part.strip()):
        if item == "min":
            value = minimum
        elif item == "unbounded":
            value = None
        elif item.endswith("%"):
            value = max(minimum, int(float(item[:-1]) / 100 * total))
        else:
            value = max(minimum, parse_bytes(item))
        if value is not None and value >= total:
            value = None
        if all(existing != value for _, existing in points):
            points.append((item, value))
    return points


def predict(shape, profile, config, policy, budget, context) -> dict:
    request = PlanRequest(profile, gpu_budget=budget if budget is not None else "unbounded",
                          context=context, policy=policy, prefetch_depth=config.prefetch_depth,
                          cache_format=config.resolved_cache_format(), dtype=str(
                              config.torch_dtype()).replace("torch.", ""))
    prediction = make_plan(shape, request).prediction
    return {"predicted_bytes_per_token": prediction.streamed_bytes_per_step,
            "predicted_hit_rate": prediction.hit_rate,
            "predicted_tokens_per_s": prediction.tokens_per_s}


def measure(model: Path, config, prompt: str, tokens: int) -> tuple:
    """One real run: the engine's counters for a greedy generation after a warm-up."""
    with load(model, config) as engine:
        # Warm up (kernels, and the lru cache's first fill) so the counters are steady state.
        engine.generate(prompt, max_new_tokens=1, greedy=True)
        result = engine.generate(prompt, max_new_tokens=tokens, greedy=True)
        stats = result.stats
        row = {"arena_bytes": engine.plan.arena_bytes, "resident_bytes": engine.plan.resident_bytes,
               "measured_bytes_per_token": stats.h2d_bytes_per_token,
               "measured_hit_rate": stats.hit_rate,
               "measured_tokens_per_s": stats.decode_tokens_per_s,
               "stall_seconds": stats.stall_seconds, "new_tokens": stats.new_tokens,
               "forward_passes": stats.forward_passes, "prompt_tokens": stats.prompt_tokens,
               "time_to_first_token_s": stats.time_to_first_token_s}
    return row, result.token_ids


def sweep(args, model: Path, shape, profile, base) -> tuple:
    """Every (policy, budget) point: measured and predicted rows, and the token ids seen."""
    rows, outputs = [], set()
    for policy in ([args.policy] if args.policy else list(POLICIES)):
        config = replace(base, policy=policy, gpu_budget="unbounded")
        floor = make_plan(shape, PlanRequest(profile, gpu_budget="unbounded", policy=policy,
                                             prefetch_depth=config.prefetch_depth,
                                             cache_format=config.resolved_cache_format()))
        for label, budget in budget_points(args.budgets, floor):
            run_config = replace(config, gpu_budget=budget if budget is not None else "unbounded")
            measured, token_ids = measure(model, run_config, args.prompt, args.tokens)
            context = measured["prompt_tokens"] + args.tokens
            row = {"policy": policy, "budget": label,
                   "budget_bytes": budget if budget is not None else floor.cache.total_bytes,
                   **measured, **predict(shape, profile, config, policy, budget, context)}
            rows.append(row)
            outputs.add(tuple(token_ids))
            print(f"{policy:>6} {label:>9} budget {row['budget_bytes'] / 1e6:8.2f} MB: "
                  f"{row['measured_bytes_per_token'] / 1e6:8.2f} MB/token "
                  f"(predicted {row['predicted_bytes_per_token'] / 1e6:.2f}), hit rate "
                  f"{row['measured_hit_rate']:.1%} ({row['predicted_hit_rate']:.1%}), "
                  f"{row['measured_tokens_per_s']:.2f} tok/s "
                  f"({row['predicted_tokens_per_s']:.3g}), stall {row['stall_seconds']:.2f} s",
                  flush=True)
    return rows, outputs


def linear_overhead(calls: int, device: torch.device, dtype: torch.dtype,
                    repeats: int = 7) -> list:
    """Microseconds per call: OffloadedLinear (resident, dequantized) vs nn.Linear."""
    from offload_engine.planning.policy import plan_cache
    from offload_engine.planning.sizes import held_nbytes
    from offload_engine.quant.layout import QuantSpec
    from offload_engine.quant.quantize import dequantize_weight, quantize_weight
    from offload_engine.runtime.cache import DeviceCache
    from offload_engine.runtime.linear import OffloadedLinear
    from offload_engine.runtime.store import HostStore

    torch.manual_seed(0)
    results = []
    for in_features, out_features in OVERHEAD_SHAPES:
        weight = quantize_weight(torch.randn(out_features, in_features), QuantSpec("int4", 64))
        store = HostStore({"w": weight}, pinned=False)
        plan = plan_cache([("w", held_nbytes(weight, "dequantized", dtype), weight.nbytes)],
                          None)
        cache = DeviceCache(store, ["w"], plan, device, "dequantized", dtype, progress=False)
        offloaded = OffloadedLinear("w", in_features, out_features, has_bias=False)
        offloaded.attach(cache)
        plain = torch.nn.Linear(in_features, out_features, bias=False, device=device,
                                dtype=dtype)
        plain.weight.data = dequantize_weight(weight, dtype).to(device)
        x = torch.randn(1, in_features, device=device, dtype=dtype)
        try:
            with torch.inference_mode():
                assert torch.equal(offloaded(x), plain(x))  # the same matmul on the same data
                plain_us = _median_call_us(plain, x, calls, repeats)
                offloaded_us = _median_call_us(offloaded, x, calls, repeats)
        finally:
            cache.close()
        results.append({"in_features": in_features, "out_features": out_features,
                        "nn_linear_us": plain_us, "offloaded_linear_us": offloaded_us,
                        "overhead_us": offloaded_us - plain_us})
    return results


def _median_call_us(module, x, calls: int, repeats: int) -> float:
    for _ in range(min(calls, 100)):  # warm up
        module(x)
    timings = []
    for _ in range(repeats):
        _synchronize(x.device)
        started = time.perf_counter_ns()
        for _ in range(calls):
            module(x)
        _synchronize(x.device)
        timings.append((time.perf_counter_ns() - started) / calls / 1e3)
    return statistics.median(timings)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_csv(rows: list, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list, path: Path, title: str) -> bool:
    """Bytes/token, hit rate and tokens/s against the budget; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed, so no plot was drawn (the CSV has every number): "
              "pip install 'offload-engine[plot]'")
        return False
    panels = (("bytes_per_token", "host->device MB per token", 1e-6),
              ("hit_rate", "hit rate", 1.0), ("tokens_per_s", "decode tokens/s", 1.0))
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for axis, (key, label, scale) in zip(axes, panels, strict=True):
        for index, policy in enumerate(sorted({row["policy"] for row in rows})):
            mine = sorted((r for r in rows if r["policy"] == policy),
                          key=lambda r: r["budget_bytes"])
            budgets = [r["budget_bytes"] / 1e6 for r in mine]
            color = f"C{index}"
            axis.plot(budgets, [r[f"measured_{key}"] * scale for r in mine], "o-", color=color,
                      label=f"{policy} measured")
            axis.plot(budgets, [r[f"predicted_{key}"] * scale for r in mine], "x--",
                      color=color, alpha=0.7, label=f"{policy} PREDICTED")
        axis.set_xlabel("weight budget (MB; rightmost = unbounded)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        base = replace(engine_config_from_args(
            argparse.Namespace(**{**vars(args), "policy": "static"})), progress=False)
        model = resolve_model(args.model)
        device = base.torch_device()
        profile = load_profile(args.hw_profile or ("cpu" if device.type == "cpu" else "rtx3090"))
        shape = describe_model(model)
    except OffloadError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    name = device_name(device) if device.type == "cuda" else f"CPU ({host_name()})"
    print(f"model {model}\ndevice {device}: {name}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    if device.type == "cpu":
        print("these are CPU timings: bytes per token and hit rate carry over to a GPU, "
              "tokens/s and stall time do not")
    print(f"predictions: planner with hardware profile {profile.name!r}")
    rows, outputs = sweep(args, model, shape, profile, base)
    identical = len(outputs) == 1
    print(f"greedy tokens identical across every budget and policy: {identical}")
    overhead = (linear_overhead(args.overhead_calls, device, base.torch_dtype())
                if args.overhead_calls > 0 else [])
    for item in overhead:
        print(f"Linear {item['in_features']}x{item['out_features']}, 1 row: nn.Linear "
              f"{item['nn_linear_us']:.1f} us, OffloadedLinear (resident) "
              f"{item['offloaded_linear_us']:.1f} us per call: {item['overhead_us']:+.1f} us")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out_dir / "bench.csv")
    title = (f"{model.name}: {args.tokens} greedy tokens per run on {name}"
             + (" (CPU timings)" if device.type == "cpu" else "")
             + f"; dashed = PREDICTED with profile {profile.name}")
    drew = plot(rows, args.out_dir / "bench.png", title)
    summary = {"model": str(model), "device": str(device), "device_name": name,
               "cpu_run": device.type == "cpu", "torch": torch.__version__,
               "threads": torch.get_num_threads(), "profile": profile.name,
               "tokens": args.tokens, "prompt": args.prompt, "identical_outputs": identical,
               "linear_overhead": overhead, "rows": rows, "command": sys.argv}
    (args.out_dir / "bench.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out_dir / 'bench.csv'}, {args.out_dir / 'bench.json'}"
          + (f", {args.out_dir / 'bench.png'}" if drew else ""))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
