"""The words the engine's settings accept, shared by the planner and the runtime config.

Both validate the same flags (``--dtype``, ``--gpu-budget unbounded``,
``--embeddings``); keeping the vocabularies here lets the planner sit below the
runtime without importing it.
"""

from __future__ import annotations

import torch

from .words import DTYPE_NAMES, EMBEDDING_PLACES, UNBOUNDED  # noqa: F401

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
