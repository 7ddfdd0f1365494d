"""The package version, in one place: the CLI and written manifests report it."""

__version__ = "0.1.0"
