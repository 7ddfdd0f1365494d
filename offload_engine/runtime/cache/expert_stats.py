"""The expert counters of one generate call or bench point, from two stats snapshots."""

from __future__ import annotations


def expert_counters(before: dict, after: dict) -> dict:
    """The expert counters between two ``CacheStats.as_dict()`` snapshots; {} without
    expert work (a dense model)."""
    tokens = after.get("expert_tokens", 0) - before.get("expert_tokens", 0)
    if tokens <= 0:
        return {}

    def delta(key: str) -> int:
        return after.get(key, 0) - before.get(key, 0)

    hits, misses, copied = delta("expert_hits"), delta("expert_misses"), delta("expert_h2d_bytes")
    predicted, cpu = delta("expert_predicted"), delta("expert_cpu")
    uses = hits + misses + cpu
    return {"expert_hit_rate": hits / uses if uses else 0.0,
            "expert_bytes_per_token": copied / tokens,
            "experts_fetched_per_token": misses / tokens,
            "experts_used_per_token": uses / tokens,
            "experts_cpu_per_token": cpu / tokens,
            "experts_prefetched_per_token": delta("expert_prefetch_hits") / tokens,
            "experts_prefetch_unused_per_token": max(0, delta("expert_prefetches")
                                                     - delta("expert_prefetch_hits")) / tokens,
            "expert_prefetch_accuracy": (delta("expert_predicted_used") / predicted
                                         if predicted else None)}
