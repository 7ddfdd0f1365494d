"""PREDICTED decode steps of a model on several cards: streaming vs hybrid CPU placement.

  python tools/placement_table.py                       Qwen2.5-32B, int4-asym g128, 8-24 GB
  python tools/placement_table.py --model llama-3-70b --cards rtx3090 rtx4090

For each card, `plan`'s two predictions (planning/placement.py): every weight through the
device cache (stream) and the parts that do not fit computed on the CPU from host RAM
(hybrid), with the placement `--placement auto` picks. The CPU figure is the profile's
cpu_bandwidth_gb_s (an ESTIMATE in the shipped presets). These are PREDICTIONS from the
bandwidth model, not measurements.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

CARDS = ("rtx4060-8gb", "rtx3060-12gb", "rtx4060ti-16gb", "rtx4090")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-32b", help="a built-in model preset")
    parser.add_argument("--cards", nargs="+", default=list(CARDS), help="hardware profiles")
    parser.add_argument("--context", type=int, default=4096)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from offload_engine.model.presets import preset_config
    from offload_engine.planning.planner import PlanRequest, describe_model, make_plan
    from offload_engine.planning.profiles import load_profile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(preset_config(args.model)))
        shape = describe_model(path)
    print(f"PREDICTION (bandwidth model, not measured): {args.model}, "
          f"{shape.spec.scheme} g{shape.spec.group_size}, context {args.context}, batch 1")
    print("| card | memory | host->device | CPU int4 kernel | stream | hybrid | auto picks "
          "| parts on the CPU |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.cards:
        profile = load_profile(name)
        plan = make_plan(shape, PlanRequest(profile, context=args.context))
        info = plan.placement
        stream, hybrid = info["predicted_stream_step_s"], info["predicted_hybrid_step_s"]
        print(f"| {name} | {profile.memory_bytes / 2**30:.0f} GiB | "
              f"{profile.h2d_bandwidth / 1e9:.0f} GB/s | "
              f"{profile.cpu_bandwidth / 1e9:.0f} GB/s (ESTIMATE) | "
              f"{1 / stream:.2f} tok/s | "
              + (f"{1 / hybrid:.2f} tok/s" if hybrid else "n/a (all fits)")
              + f" | {info['placement_chosen']} | {info['cpu_parts']} "
              f"({info['cpu_part_bytes'] / 1e9:.1f} GB) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
