"""Eager against --compile on one model, in one process: ops per step, tok/s, warm-up, profile.

  OMP_WAIT_POLICY=PASSIVE python tools/compile_table.py              the embedded SmolLM2
  python tools/compile_table.py DIR --tokens 32 --rounds 5 --gpu-budget 50MiB --kv-cache int8

Both engines are loaded side by side and warmed up (the compiled one compiles its decode
step then: the warm-up seconds), then decoded alternately ``--rounds`` times (median
tok/s reported, every run listed), so a busy machine slows both alike. Ops per step are
the torch ops dispatched per decode step (model/op_count.py's ``dispatched_ops``, counted
over ``--count-tokens`` extra steps); the profile lists where each step's CPU time goes.
Greedy tokens must be identical (exit 1 otherwise). The numbers in docs/performance.md's
"Compiled decode step" section come from this script.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from offload_engine.cli.bench_cmd import resolve_model
from offload_engine.cli.options import add_engine_args, engine_config_from_args

PROMPT = "The three most important ideas in computer science are"


def inspector(tokens: int, profile_rows: int):
    """What to measure on each warmed-up engine after the timed runs."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from offload_engine.model.op_count import dispatched_ops

    def run(engine, new_tokens: int):
        return lambda: engine.generate(PROMPT, greedy=True, max_new_tokens=new_tokens)

    def inspect(engine) -> dict:
        base, longer = dispatched_ops(run(engine, 1)), dispatched_ops(run(engine, 1 + tokens))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(engine, 1 + tokens)()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=profile_rows)
        return {"ops_per_step": (longer - base) / tokens, "profile": table,
                "threads": torch.get_num_threads()}

    return inspect


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per timed run")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each, alternating")
    parser.add_argument("--count-tokens", type=int, default=8,
                        help="decode steps the op count and the profile cover")
    parser.add_argument("--profile-rows", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("compile-table.json"))
    add_engine_args(parser)
    args = parser.parse_args(argv)

    import torch

    from offload_engine.decode import bench

    if args.threads:
        torch.set_num_threads(args.threads)
    config = engine_config_from_args(args)
    config.progress = False
    model = resolve_model(args.model)
    budget = config.budget_bytes()
    point = bench.BenchPoint(config.policy, str(config.gpu_budget or "unbounded"), budget,
                             config.prefetch_depth, 1)
    rows = bench.measure_compiled(model, config, point, PROMPT, args.tokens, args.rounds,
                                  inspect=inspector(args.count_tokens, args.profile_rows))
    env = bench.environment(config.torch_device())
    print(f"model {model}; {env['device_name']}, torch {env['torch']}, {env['threads']} "
          f"threads, commit {env['commit']}; kv-cache {config.kv_cache}, budget "
          f"{point.budget}; {args.rounds} alternating runs of {args.tokens} tokens")
    for row in rows:
        name = "compiled" if row["compile"] else "eager"
        print(f"{name:>9}: {row['decode_tokens_per_s']:.2f} tok/s median (runs "
              f"{row['runs_tokens_per_s']}), {row['ops_per_step']:.0f} ops/step, warm-up "
              f"{row['warmup_s']:.1f} s (compiling {row['compile_seconds']:.1f} s of a "
              f"later run)")
    eager, compiled = rows
    speedup = compiled["decode_tokens_per_s"] / max(eager["decode_tokens_per_s"], 1e-9)
    identical = eager["token_ids"] == compiled["token_ids"]
    print(f"compiled / eager tok/s: {speedup:.2f}x; greedy tokens identical: {identical}")
    for row in rows:
        print(f"\nprofile of {args.count_tokens + 1} tokens, "
              f"{'compiled' if row['compile'] else 'eager'}:\n{row['profile']}")
    args.out.write_text(json.dumps({"model": str(model), **env, "speedup": speedup,
                                    "identical": identical, "rows": rows,
                                    "command": sys.argv}, indent=1, default=str))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
