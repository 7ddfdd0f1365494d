"""Server counters, written by the scheduler thread and read by /metrics (under one lock)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Optional


class Metrics:
    """Counters of requests, tokens and batches, plus the engine's cache counters.

    The engine's own stats are copied here by the scheduler thread after every step, so
    /metrics never touches the engine while a forward runs.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter = Counter()  # requests_*, tokens_generated, prefill*
        self._batches = 0  # decode forwards run
        self._batch_rows = 0  # rows over all decode forwards (for the mean batch size)
        self._max_batch_seen = 0
        self._busy_seconds = 0.0  # time spent in scheduler steps
        self._queue_depth = 0  # requests waiting for a batch slot
        self._active = 0  # requests being decoded
        self._engine: dict = {}
        self._h2d_at_start: Optional[int] = None  # engine's h2d_bytes when serving began
        self._compile_seconds: Optional[float] = None  # --compile warm-up; None: eager
        self._started = time.monotonic()

    def count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] += amount

    def record_batch(self, rows: int) -> None:
        with self._lock:
            self._batches += 1
            self._batch_rows += rows
            self._max_batch_seen = max(self._max_batch_seen, rows)

    def add_busy(self, seconds: float) -> None:
        with self._lock:
            self._busy_seconds += seconds

    def set_queue(self, waiting: int, active: int) -> None:
        with self._lock:
            self._queue_depth, self._active = waiting, active

    def set_compile_seconds(self, seconds: Optional[float]) -> None:
        """Seconds spent compiling the decode step so far (None when not compiled)."""
        with self._lock:
            self._compile_seconds = seconds

    def snapshot_engine(self, stats: dict) -> None:
        with self._lock:
            self._engine = dict(stats)
            if self._h2d_at_start is None:
                self._h2d_at_start = stats.get("h2d_bytes", 0)

    def snapshot(self) -> dict:
        """Every counter as plain JSON-ready numbers."""
        with self._lock:
            tokens = self._counts["tokens_generated"]
            h2d = self._engine.get("h2d_bytes", 0) - (self._h2d_at_start or 0)
            return {
                "requests_served": self._counts["requests_served"],
                "requests_cancelled": self._counts["requests_cancelled"],
                "requests_failed": self._counts["requests_failed"],
                "requests_rejected": self._counts["requests_rejected"],
                "tokens_generated": tokens,
                "tokens_per_s": tokens / self._busy_seconds if self._busy_seconds else 0.0,
                "busy_seconds": self._busy_seconds,
                # weight bytes copied host->device per generated token: one pass over the
                # streamed weights serves the whole batch, so this falls as batches grow
                "h2d_bytes_per_token": h2d / tokens if tokens else 0.0,
                "uptime_seconds": time.monotonic() - self._started,
                "prefills": self._counts["prefills"],  # requests prefilled
                # prefill forwards: the prompts admitted in one step share one (each pass
                # streams the non-resident weights once), so this stays below prefills
                "prefill_passes": self._counts["prefill_passes"],
                # --speculate lookup, lone sequences only (server/speculative_step.py)
                "speculative_proposed": self._counts["speculative_proposed"],
                "speculative_accepted": self._counts["speculative_accepted"],
                "batches_run": self._batches,
                "max_batch_size_seen": self._max_batch_seen,
                "mean_batch_size": self._batch_rows / self._batches if self._batches else 0.0,
                # serve --compile: seconds spent compiling the decode step (its warm-up,
                # once per KV cache bucket); 0.0 until the first decode step, None eager
                "compiled": self._compile_seconds is not None,
                "compile_warmup_seconds": self._compile_seconds,
                "queue_depth": self._queue_depth,
                "active_sequences": self._active,
                "cache": dict(self._engine),
            }
