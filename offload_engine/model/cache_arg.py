"""The keyword a transformers model takes and returns its KV cache by.

transformers 5.24 renamed the models' ``past_key_values=`` argument and output field to
``cache`` and removes the old name in 5.40; 5.14-5.23 know only ``past_key_values``.
Every caller passes the cache through :func:`cache_kwargs` and reads it back with
:func:`output_cache`, so the supported range works without deprecation warnings.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

NEW_NAME = "cache"
OLD_NAME = "past_key_values"


@functools.cache
def _forward_takes_cache(model_class: type) -> bool:
    return NEW_NAME in inspect.signature(model_class.forward).parameters


def cache_name(model) -> str:
    """``"cache"`` where the model's forward (and generate) take it, else ``"past_key_values"``."""
    return NEW_NAME if _forward_takes_cache(type(model)) else OLD_NAME


def cache_kwargs(model, cache: Any) -> dict:
    """``{name: cache}`` for a forward or generate call; {} when ``cache`` is None."""
    return {} if cache is None else {cache_name(model): cache}


def output_cache(output) -> Any:
    """The KV cache a forward returned, under whichever name this transformers uses."""
    cache = getattr(output, NEW_NAME, None)
    return cache if cache is not None else getattr(output, OLD_NAME, None)
