"""The bounded device cache: one preallocated arena, resident weights, a staging ring.

Which weights stay resident and which slot is refilled are decided in
:mod:`offload_engine.planning.policy`; this package carries the decision out.
"""

from .device_cache import CacheStats, DeviceCache, Handle
from .expert_stats import expert_counters

__all__ = ["CacheStats", "DeviceCache", "Handle", "expert_counters"]
