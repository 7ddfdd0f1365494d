"""offload-engine: run large language models on small GPUs by streaming INT4 weights."""

__version__ = "0.1.0"
