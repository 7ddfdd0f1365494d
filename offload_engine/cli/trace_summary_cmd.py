"""``offload-engine trace-summary TRACE``: where the time of a profiled run went."""

from __future__ import annotations

import json
from pathlib import Path


def register(commands) -> None:
    parser = commands.add_parser(
        "trace-summary", help="summarise a trace written by `run --profile-trace`",
        description="For each named range (offload.fetch, offload.wait, offload.linear): "
                    "count, total ms and mean us; the share of copy time hidden under "
                    "compute on another thread; and the total stall time.")
    parser.add_argument("trace", type=Path, help="a Chrome trace from `run --profile-trace`")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from ..runtime.trace_summary import format_summary, summarise_file

    summary = summarise_file(args.trace)
    print(json.dumps(summary.as_dict(), indent=1) if args.json
          else "\n".join(format_summary(summary)))
    return 0
