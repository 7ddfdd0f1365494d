"""Print a constraints file of the packages installed in this Python (`make constraints`).

Run with a venv's python after its test suite passed: the versions it prints are the
tested ones that `make setup` (and so CI) installs. torch, triton and NVIDIA's runtime
wheels are left out: the Makefile installs the CPU build, a GPU machine brings its own.
"""

from __future__ import annotations

import re
from importlib import metadata

HEADER = """\
# Tested versions: 'make setup'/'make test' (and so CI) install with -c constraints.txt.
# pyproject's ranges stay open for users. To move forward: 'make test-latest' (newest
# releases in .venv-latest), then 'make constraints' writes that venv's versions here.
# torch/triton are not pinned here: the CPU build comes from CPU_TORCH in the Makefile,
# a GPU machine brings its own CUDA build."""
LEFT_OUT = re.compile(r"^(torch|triton|nvidia-.*|offload-engine|pip|setuptools|wheel)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main() -> None:
    pins = {}
    for dist in metadata.distributions():
        name = canonical(dist.metadata["Name"])
        if not LEFT_OUT.match(name):
            pins[name] = dist.version
    print(HEADER)
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")


if __name__ == "__main__":
    main()
