"""What the expert prefetch worker is handed and what it reports (see expert_cache.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from ...errors import WorkerError
from ..prefetch import Copier, CopyJob


@dataclass
class ExpertJob:
    """One expert's matrix copies, for the prefetch worker."""

    layer: str
    expert: int
    slot: object  # the ExpertSlot it fills
    copies: List[CopyJob] = field(default_factory=list)


class ExpertCopier:
    """Runs an ExpertJob's copies in order; an error names the weight that failed."""

    def __init__(self, copier: Copier):
        self.copier = copier

    def run(self, job: ExpertJob) -> None:
        for copy in job.copies:
            try:
                self.copier.run(copy)
            except Exception as exc:
                raise WorkerError(f"prefetching expert weight {copy.name!r} failed: "
                                  f"{type(exc).__name__}: {exc}") from exc


@dataclass
class WorkerCounts:
    """What the prefetch worker did, folded into the stats by the compute thread (the
    only writer of CacheStats' expert counters)."""

    experts: int = 0
    nbytes: int = 0
    evictions: int = 0
