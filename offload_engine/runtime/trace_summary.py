"""Where did the time go? Summarise a trace written by ``offload-engine run --profile-trace``.

  offload-engine trace-summary trace.json [--json]

Reports, for each named range (offload.fetch, offload.wait, offload.linear): count,
total ms and mean us; the share of copy time (offload.fetch, on the prefetch worker's
thread) hidden under compute (offload.linear minus its offload.wait, on another
thread); and the total stall time (offload.wait).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

from ..errors import FormatError
from .ranges import RANGE_NAMES

FETCH, WAIT, LINEAR = "offload.fetch", "offload.wait", "offload.linear"
Interval = Tuple[float, float]  # (start us, end us)


@dataclass(frozen=True)
class Span:
    """One complete ("X") event of the trace."""

    name: str
    tid: object  # thread id as the trace spells it
    start_us: float
    end_us: float

    @property
    def duration_us(self) -> float:
        return self.end_us - self.start_us


@dataclass
class RangeStats:
    count: int = 0
    total_ms: float = 0.0
    mean_us: float = 0.0


@dataclass
class TraceSummary:
    """The answer to "where did the time go"."""

    ranges: Dict[str, RangeStats] = field(default_factory=dict)  # per range name
    fetch_ms: float = 0.0  # all host-to-device copy time
    hidden_fetch_ms: float = 0.0  # copy time overlapped by compute on another thread
    stall_ms: float = 0.0  # compute waiting for copies (offload.wait)
    compute_ms: float = 0.0  # linear time not spent waiting
    threads: Dict[str, List[str]] = field(default_factory=dict)  # range -> thread ids

    @property
    def hidden_share(self) -> float:
        return self.hidden_fetch_ms / self.fetch_ms if self.fetch_ms else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "hidden_share": self.hidden_share}


def load_spans(path: Path, names: Iterable[str] = RANGE_NAMES) -> List[Span]:
    """The complete events named in ``names``, from a Chrome trace JSON file."""
    data = json.loads(Path(path).read_text())
    events = data["traceEvents"] if isinstance(data, dict) else data
    wanted = set(names)
    return [Span(e["name"], e.get("tid"), float(e["ts"]), float(e["ts"]) + float(e["dur"]))
            for e in events
            if e.get("ph") == "X" and e.get("name") in wanted and "dur" in e]


def merge(intervals: Iterable[Interval]) -> List[Interval]:
    """Sorted, non-overlapping union of intervals."""
    merged: List[List[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end) for start, end in merged]


def subtract(keep: List[Interval], remove: List[Interval]) -> List[Interval]:
    """``keep`` minus ``remove``; both merged (sorted, disjoint)."""
    result, index = [], 0
    for start, end in keep:
        cursor = start
        while index < len(remove) and remove[index][1] <= cursor:
            index += 1
        probe = index
        while probe < len(remove) and remove[probe][0] < end:
            cut_start, cut_end = remove[probe]
            if cut_start > cursor:
                result.append((cursor, cut_start))
            cursor = max(cursor, cut_end)
            probe += 1
        if cursor < end:
            result.append((cursor, end))
    return result


def overlap(intervals: List[Interval], covered: List[Interval]) -> float:
    """Total length of ``intervals`` (merged) inside ``covered`` (merged)."""
    total, index = 0.0, 0
    for start, end in intervals:
        while index < len(covered) and covered[index][1] <= start:
            index += 1
        probe = index
        while probe < len(covered) and covered[probe][0] < end:
            total += min(end, covered[probe][1]) - max(start, covered[probe][0])
            probe += 1
    return total


def compute_intervals(spans: List[Span]) -> Dict[object, List[Interval]]:
    """Per thread: time inside offload.linear but not inside offload.wait."""
    per_thread: Dict[object, List[Interval]] = {}
    for tid in {s.tid for s in spans if s.name == LINEAR}:
        linear = merge((s.start_us, s.end_us) for s in spans if s.name == LINEAR and s.tid == tid)
        waits = merge((s.start_us, s.end_us) for s in spans if s.name == WAIT and s.tid == tid)
        per_thread[tid] = subtract(linear, waits)
    return per_thread


def summarise(spans: List[Span]) -> TraceSummary:
    summary = TraceSummary()
    for name in RANGE_NAMES:
        mine = [s for s in spans if s.name == name]
        total_us = sum(s.duration_us for s in mine)
        summary.ranges[name] = RangeStats(len(mine), total_us / 1e3,
                                          total_us / len(mine) if mine else 0.0)
        summary.threads[name] = sorted({str(s.tid) for s in mine})
    compute = compute_intervals(spans)
    summary.compute_ms = sum(end - start for ivs in compute.values() for start, end in ivs) / 1e3
    for tid in {s.tid for s in spans if s.name == FETCH}:
        fetches = merge((s.start_us, s.end_us) for s in spans if s.name == FETCH and s.tid == tid)
        others = merge(iv for other, ivs in compute.items() if other != tid for iv in ivs)
        summary.fetch_ms += sum(end - start for start, end in fetches) / 1e3
        summary.hidden_fetch_ms += overlap(fetches, others) / 1e3
    summary.stall_ms = summary.ranges[WAIT].total_ms
    return summary


def format_summary(summary: TraceSummary) -> List[str]:
    lines = [f"{'range':<16}{'count':>8}{'total ms':>12}{'mean us':>12}  threads"]
    for name, stats in summary.ranges.items():
        lines.append(f"{name:<16}{stats.count:>8}{stats.total_ms:>12.2f}{stats.mean_us:>12.1f}"
                     f"  {', '.join(summary.threads.get(name, [])) or '-'}")
    lines += [
        f"copy time (offload.fetch): {summary.fetch_ms:.2f} ms, of which hidden under compute "
        f"{summary.hidden_fetch_ms:.2f} ms ({summary.hidden_share:.1%})",
        f"compute in offload.linear (waits excluded): {summary.compute_ms:.2f} ms",
        f"total stall (offload.wait): {summary.stall_ms:.2f} ms",
    ]
    if not summary.ranges[FETCH].count:
        lines.append("no offload.fetch ranges: every weight was resident, or this torch could "
                     "not record the worker thread")
    return lines


def summarise_file(path: Path) -> TraceSummary:
    """The summary of the trace file at ``path``; a FormatError when it is no Chrome trace."""
    try:
        spans = load_spans(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"{path}: cannot read a Chrome trace ({exc}); write one with "
                          "`offload-engine run MODEL --prompt ... --profile-trace FILE`") from exc
    return summarise(spans)
