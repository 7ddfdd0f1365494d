"""What does checksum verification add to loading? Measured, on this machine.

  python tools/checksum_cost.py MODEL_DIR [--repeat 3] [--json]

Loads MODEL_DIR with ``offload_engine.load`` on the CPU (verification on, as by
default) and reports the best load time of ``--repeat`` runs; then reads every stored
tensor again and times only the CRC-32 check the loader runs on each one. The share
is check time / load time. Runs with a warm page cache (the first load warms it), so
the share is an upper bound for a load that waits on a disk.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import offload_engine
from offload_engine.checkpoint.checksums import tensor_crc
from offload_engine.checkpoint.format import load_component, read_manifest


def load_seconds(directory: Path, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        with offload_engine.load(directory, device="cpu", progress=False):
            best = min(best, time.perf_counter() - started)
    return best


def check_seconds(directory: Path) -> tuple:
    """(seconds spent in the per-tensor CRC-32 check, bytes checked)."""
    manifest = read_manifest(directory)
    headers: dict = {}
    seconds, nbytes = 0.0, 0
    for entry in manifest.tensors.values():
        for comp in entry.components.values():
            tensor = load_component(directory, comp, headers)
            started = time.perf_counter()
            tensor_crc(tensor)
            seconds += time.perf_counter() - started
            nbytes += tensor.numel() * tensor.element_size()
    return seconds, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a directory written by `quantize`")
    parser.add_argument("--repeat", type=int, default=3, help="loads to time (best is kept)")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args()
    load = load_seconds(args.model, args.repeat)
    check, nbytes = check_seconds(args.model)
    result = {"model": str(args.model), "device": "cpu", "load_seconds": round(load, 4),
              "check_seconds": round(check, 6), "checked_bytes": nbytes,
              "check_share": round(check / load, 6),
              "check_mib_per_s": round(nbytes / 2**20 / check, 1) if check else None}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"CPU run, {args.model}: load {load:.2f} s (best of {args.repeat}), of which the "
          f"checksum check {check:.3f} s ({result['check_share']:.1%}) for "
          f"{nbytes / 2**20:.1f} MiB ({result['check_mib_per_s']} MiB/s)")


if __name__ == "__main__":
    main()
