"""``offload-engine calibrate``: measure this machine and write a hardware profile TOML."""

from __future__ import annotations

import re
from pathlib import Path


def register(commands) -> None:
    parser = commands.add_parser(
        "calibrate", help="measure this GPU (or CPU) and write a hardware profile",
        description="Measure host->device GB/s, device memory GB/s, the decode kernel's GB/s "
                    "on real shapes and the per-op overhead of an eager decode step, and write "
                    "a profile TOML that `plan --hw-profile` and `run --hw-profile` accept; "
                    "with --disk-dir, also how fast that disk reads (for --host-budget). "
                    "Works on CPU too (a CPU profile).")
    parser.add_argument("--device", default="auto", help="cuda:0, cpu; auto: cuda:0 if present")
    parser.add_argument("-o", "--output", type=Path, default=None, metavar="PATH",
                        help="profile file to write (default: ./<name>.toml)")
    parser.add_argument("--name", default=None,
                        help="the profile's name (default: from the device name)")
    parser.add_argument("--reserve", default=None, metavar="B",
                        help="memory never planned for (default 1GiB on CUDA, 2GiB on CPU)")
    parser.add_argument("--quick", action="store_true",
                        help="small, fast measurements (tests; less exact)")
    parser.add_argument("--disk-dir", type=Path, default=None, metavar="DIR",
                        help="also measure cold reads from this directory's disk (put it where "
                             "your models live; writes and removes a scratch file of up to "
                             "1 GiB); the profile's disk_read_gb_s, used by --host-budget plans")
    parser.add_argument("--force", action="store_true", help="replace the output file")
    parser.set_defaults(handler=run)


def run(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from ..errors import ConfigError
    from ..planning.profiles import load_profile
    from ..runtime.calibrate import calibrate, profile_toml
    from ..runtime.config import resolve_device
    from .outputs import check_output

    device = resolve_device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    name = args.name or re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    output = args.output or Path(f"{name}.toml")
    if output.exists() and not args.force:  # before minutes of measuring, not after
        raise ConfigError(f"{output} already exists; pass --force to replace it or -o another")
    check_output(output, "-o/--output")
    steps = tqdm(total=4 + (args.disk_dir is not None), desc="calibrating", unit="measurement")

    def advance(label: str) -> None:
        steps.set_postfix_str(f"{label} done")
        steps.update(1)

    with steps:
        result = calibrate(device, quick=args.quick, progress=advance, disk_dir=args.disk_dir)
    reserve = args.reserve or ("1GiB" if device.type == "cuda" else "2GiB")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(profile_toml(result, name, reserve), encoding="utf-8")
    profile = load_profile(output)  # what plan/run will read: fail here, not there
    label = "CPU (these are CPU figures)" if device.type == "cpu" else result.device_name
    print(f"device {device}: {label}, torch {result.torch_version}")
    print(f"  host->device      {result.h2d_bandwidth / 1e9:10.3f} GB/s")
    print(f"  device memory     {result.device_bandwidth / 1e9:10.3f} GB/s (copy, read + write)")
    print(f"  decode kernel     {result.kernel_bandwidth / 1e9:10.3f} GB/s (weight bytes read)")
    print(f"  per-op overhead   {result.op_overhead_s * 1e6:10.3f} us "
          f"({result.step_seconds * 1e3:.3f} ms per step / {result.ops_per_step} ops)")
    if result.disk_read_bandwidth is not None:
        print(f"  disk reads        {result.disk_read_bandwidth / 1e9:10.3f} GB/s "
              f"(cold, {args.disk_dir})")
    print(f"wrote {output} (profile {profile.name!r}): use it with "
          f"`offload-engine plan MODEL --hw-profile {output}`")
    return 0
