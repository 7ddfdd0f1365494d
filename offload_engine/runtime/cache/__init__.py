"""The bounded device cache. Policy decisions live in :mod:`.policy` and nowhere else."""

from .arena import CACHE_FORMATS, held_nbytes
from .device_cache import CacheStats, DeviceCache, Handle
from .policy import POLICIES, CachePlan, plan_cache

__all__ = [
    "CACHE_FORMATS", "POLICIES", "CachePlan", "CacheStats", "DeviceCache", "Handle",
    "held_nbytes", "plan_cache",
]
