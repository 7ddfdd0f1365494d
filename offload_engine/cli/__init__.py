"""The ``offload-engine`` command line: one subcommand module each, one entry point."""

from .main import main

__all__ = ["main"]
