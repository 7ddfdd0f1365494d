"""Hardware profiles: the few numbers of a card that decide whether a model fits and how fast.

A profile is a small TOML file. The presets ship inside the package
(``offload_engine/profiles_data/NAME.toml``); a user can write their own and pass
its path. Example::

    name = "rtx3090"
    description = "NVIDIA GeForce RTX 3090, 24 GB GDDR6X, PCIe 4.0 x16"
    device = "cuda"                 # or "cpu"
    memory = "24GiB"                # device memory (VRAM); host RAM for "cpu"
    device_bandwidth_gb_s = 936.0   # device memory read bandwidth, decimal GB/s
    h2d_bandwidth_gb_s = 24.0       # pinned host-to-device copies, decimal GB/s
    reserve = "1GiB"                # kept free: CUDA context, workspace, fragmentation
    disk_read_gb_s = 3.0            # optional: reads from the model's disk (--host-budget)
    op_overhead_us = 8.0            # optional: seconds per eager op of a decode step
    op_overhead_source = "ESTIMATE: ..."   # where that figure comes from
    cpu_bandwidth_gb_s = 40.0       # optional: weight bytes/s the CPU int4 kernel reads

`offload-engine calibrate` writes the same keys, plus ``kernel_bandwidth_gb_s``, a
``measured`` list naming the keys it measured and a ``calibrated`` line.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import List, Optional, Union

from ..errors import ConfigError
from ..units import parse_bytes

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

DATA_PACKAGE_DIR = "profiles_data"
DEVICES = ("cuda", "cpu")
DEFAULT_PROFILE = "rtx3090"
GB = 1e9  # bandwidths are quoted in decimal GB/s, as vendors and benchmarks quote them
REQUIRED_KEYS = ("name", "device", "memory", "device_bandwidth_gb_s", "h2d_bandwidth_gb_s",
                 "reserve")
# Disk speed, per-op overhead and calibration facts: optional so older profile files load.
OPTIONAL_KEYS = ("description", "disk_read_gb_s", "op_overhead_us", "op_overhead_source",
                 "measured", "kernel_bandwidth_gb_s", "calibrated", "cpu_bandwidth_gb_s",
                 "cpu_bandwidth_source")


@dataclass(frozen=True)
class HardwareProfile:
    """One card (or the CPU), as the planner sees it."""

    name: str  # short id, e.g. "rtx3090"
    device: str  # "cuda" or "cpu": decides the default compute dtype and cache format
    memory_bytes: int  # device memory; for "cpu", the host RAM the run may use
    device_bandwidth: float  # bytes/s read from device memory (what resident weights cost)
    h2d_bandwidth: float  # bytes/s host->device for streamed weights, as achieved in practice
    reserve_bytes: int  # never planned for: CUDA context, cuBLAS workspace, fragmentation
    description: str = ""  # a human-readable line naming the card and its link
    source: str = ""  # the file the profile was read from
    disk_read_bandwidth: Optional[float] = None  # bytes/s read from the model's disk, if known
    op_overhead_s: float = 0.0  # seconds per aten op of an eager decode step (launch, dispatch)
    op_overhead_source: str = ""  # where op_overhead_s comes from: a measurement or an estimate
    measured: tuple = ()  # the TOML keys `offload-engine calibrate` measured on this machine
    kernel_bandwidth: float = 0.0  # bytes/s the fused kernel achieved (0: not measured)
    calibrated: str = ""  # what calibrate ran on, and when
    cpu_bandwidth: float = 0.0  # bytes/s of weights the CPU int4 kernel reads (0: unknown)
    cpu_bandwidth_source: str = ""  # a measurement, or an ESTIMATE and its reasoning

    def __post_init__(self) -> None:
        where = self.source or self.name
        if self.device not in DEVICES:
            raise ConfigError(f"hardware profile {where}: device must be one of "
                              f"{', '.join(DEVICES)}, got {self.device!r}")
        for label, value in (("memory", self.memory_bytes),
                             ("device_bandwidth_gb_s", self.device_bandwidth),
                             ("h2d_bandwidth_gb_s", self.h2d_bandwidth)):
            if not value > 0:
                raise ConfigError(f"hardware profile {where}: {label} must be positive")
        if self.disk_read_bandwidth is not None and not self.disk_read_bandwidth > 0:
            raise ConfigError(f"hardware profile {where}: disk_read_gb_s must be positive")
        if self.op_overhead_s < 0 or self.kernel_bandwidth < 0 or self.cpu_bandwidth < 0:
            raise ConfigError(f"hardware profile {where}: op_overhead_us and "
                              "kernel_bandwidth_gb_s, cpu_bandwidth_gb_s must be 0 or more")
        if not 0 <= self.reserve_bytes < self.memory_bytes:
            raise ConfigError(f"hardware profile {where}: reserve must be at least 0 and "
                              "smaller than memory")

    @property
    def usable_bytes(self) -> int:
        """Device memory left once the reserve is set aside."""
        return self.memory_bytes - self.reserve_bytes


def available_profiles() -> List[str]:
    """Names of the presets shipped with the package."""
    return sorted(entry.name[:-5] for entry in _data_dir().iterdir()
                  if entry.name.endswith(".toml"))


def _data_dir():
    """The presets' folder inside the installed package (importlib.resources, not __file__)."""
    return resources.files(__package__).joinpath(DATA_PACKAGE_DIR)


def load_profile(name_or_path: Union[str, Path]) -> HardwareProfile:
    """A preset by name (``rtx3090``) or a TOML file by path (``./my-card.toml``)."""
    text, where = _profile_text(str(name_or_path))
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"hardware profile {where}: not valid TOML ({exc})") from exc
    return profile_from_dict(data, where)


def profile_from_dict(data: dict, where: str) -> HardwareProfile:
    """Validate the keys of a parsed profile and build the dataclass."""
    missing = [key for key in REQUIRED_KEYS if key not in data]
    unknown = sorted(set(data) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if missing or unknown:
        raise ConfigError(f"hardware profile {where}: missing keys {missing}, unknown keys "
                          f"{unknown}; the keys are {', '.join(REQUIRED_KEYS + OPTIONAL_KEYS)}")
    try:
        memory, reserve = parse_bytes(data["memory"]), parse_bytes(data["reserve"])
        device_bw = float(data["device_bandwidth_gb_s"]) * GB
        h2d_bw = float(data["h2d_bandwidth_gb_s"]) * GB
        disk_bw = (float(data["disk_read_gb_s"]) * GB if "disk_read_gb_s" in data else None)
        extras = dict(op_overhead_s=float(data.get("op_overhead_us", 0.0)) * 1e-6,
                      op_overhead_source=str(data.get("op_overhead_source", "")),
                      measured=tuple(str(key) for key in data.get("measured", ())),
                      kernel_bandwidth=float(data.get("kernel_bandwidth_gb_s", 0.0)) * GB,
                      calibrated=str(data.get("calibrated", "")),
                      cpu_bandwidth=float(data.get("cpu_bandwidth_gb_s", 0.0)) * GB,
                      cpu_bandwidth_source=str(data.get("cpu_bandwidth_source", "")))
    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
        raise ConfigError(f"hardware profile {where}: {exc}") from exc
    return HardwareProfile(name=str(data["name"]), device=str(data["device"]),
                           memory_bytes=memory, device_bandwidth=device_bw,
                           h2d_bandwidth=h2d_bw, reserve_bytes=reserve,
                           description=str(data.get("description", "")), source=where,
                           disk_read_bandwidth=disk_bw, **extras)


def _profile_text(name_or_path: str):
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.is_file():
        if not path.is_file():
            raise ConfigError(f"--hw-profile {name_or_path}: no such file")
        return path.read_text(encoding="utf-8"), str(path)
    entry = _data_dir().joinpath(f"{name_or_path}.toml")
    if not entry.is_file():
        raise ConfigError(f"--hw-profile {name_or_path!r} is neither a preset nor a .toml file; "
                          f"presets: {', '.join(available_profiles())}")
    return entry.read_text(encoding="utf-8"), f"{name_or_path} ({DATA_PACKAGE_DIR})"
