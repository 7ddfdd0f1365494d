"""The ``offload-engine`` command line: one subcommand module each, one entry point.
The top stage: may use every other folder; nothing imports it.
"""

from .main import main

__all__ = ["main"]
