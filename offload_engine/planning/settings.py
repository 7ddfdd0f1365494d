"""The words the engine's settings accept, shared by the planner and the runtime config.

Both validate the same flags (``--dtype``, ``--gpu-budget unbounded``,
``--embeddings``); keeping the vocabularies here lets the planner sit below the
runtime without importing it.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
UNBOUNDED = ("unbounded", "none", "inf", "all")  # --gpu-budget words for "no limit"
EMBEDDING_PLACES = ("device", "host")  # where the token embedding table lives
