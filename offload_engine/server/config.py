"""How the server listens, guards and batches: one dataclass, one `serve` flag per field."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

from ..errors import ConfigError

API_KEY_ENV = "OFFLOAD_ENGINE_API_KEY"  # read when --api-key is not given


@dataclass
class ServerConfig:
    """Every field has a `serve` flag of the same name (underscores as dashes)."""

    host: str = "127.0.0.1"  # loopback by default: nothing outside this machine can connect
    port: int = 8000  # TCP port; 0 picks a free one
    max_batch: int = 8  # sequences decoded together in one forward
    max_queue: int = 64  # requests waiting for a batch slot before new ones get 429
    # prompts admitted in one step are prefilled in one forward, left-padded to the longest;
    # this caps rows x longest prompt per forward (activation memory, padding compute). A
    # prompt longer than this still runs, alone
    max_prefill_tokens: int = 8192
    # clients must send "Authorization: Bearer KEY" to /v1/ routes; None: no key needed
    api_key: Optional[str] = None
    # request bodies above this get 413 before they are parsed or tokenized: tokenizing
    # megabytes takes seconds of CPU and every context we serve fits in far less
    max_body_bytes: int = 8 * 1024**2
    # chat requests without max_tokens stop here (or where the context ends, if sooner),
    # so a model that never emits end-of-sequence cannot hold a batch slot for the whole
    # context; /v1/completions keeps OpenAI's 16
    default_max_tokens: int = 1024
    # without --api-key, requests whose Host header names something else than an IP address,
    # localhost or ``host`` get 403 (DNS rebinding); names listed here are accepted too,
    # "*" accepts any
    allowed_hosts: Tuple[str, ...] = ()
    # serve /docs, /redoc and /openapi.json (FastAPI's pages, which load scripts from a CDN)
    docs: bool = False
    # on shutdown, seconds to wait for open connections to finish after their requests
    # were failed with 503 (they normally finish in milliseconds)
    shutdown_grace_s: float = 2.0
    # tokens a prompt plus its reply may take (llama.cpp's -c, vLLM's --max-model-len);
    # None: the model's own context. A larger value than the model's is capped to it
    ctx_size: Optional[int] = None
    # the model id clients see and send (/v1/models, "model"); None: the directory's name
    served_model_name: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_prefill_tokens", "max_body_bytes",
                     "default_max_tokens"):
            if getattr(self, name) < 1:
                flag = "--max-body-size" if name == "max_body_bytes" else \
                    f"--{name.replace('_', '-')}"
                raise ConfigError(f"{flag} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")
        if self.shutdown_grace_s < 0:
            raise ConfigError(f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}")
        if self.ctx_size is not None and self.ctx_size < 1:
            raise ConfigError(f"--ctx-size must be at least 1, got {self.ctx_size}")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ConfigError("--served-model-name is empty; give a name or leave the flag out")
        self.allowed_hosts = tuple(h.strip() for h in self.allowed_hosts if h.strip())
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key is empty; give a key or leave the flag out")

    @staticmethod
    def key_from_env(given: Optional[str]) -> Optional[str]:
        """The --api-key value, else the environment's, else None (no key)."""
        return given if given is not None else (os.environ.get(API_KEY_ENV) or None)
