"""`offload-engine bench` with a plot and the Linear overhead test: the command behind the
CPU tables in docs/performance.md and the README.

  OMP_WAIT_POLICY=PASSIVE python tools/bench.py          the embedded SmolLM2 (converted once)
  python tools/bench.py DIR --budgets min,50%,unbounded --tokens 4 --out-dir results/

Every flag of `offload-engine bench --help` works here; the sweep lives in
offload_engine/decode/bench.py and offload_engine/cli/bench_cmd.py.
"""

from __future__ import annotations

import sys

from offload_engine.cli import main

DEFAULTS = ["--plot", "--linear-overhead-calls", "2000"]

if __name__ == "__main__":
    sys.exit(main(["bench", *DEFAULTS, *sys.argv[1:]]))
