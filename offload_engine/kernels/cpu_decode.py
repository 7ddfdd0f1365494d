"""The decoder layer's steps around its linears, one C++ call each on CPU (``cpu_decode.cpp``).

At batch 1 on a CPU, transformers' eager code around the weights costs more than the
weights: one decode step of the demo model issued about 2,100 torch ops, and its RMSNorm
alone (8 ops) took longer than the int4 matrix-vector product after it. Each function
here does one such step in one call, with the rounding of the stock code it replaces (the
input dtype after each elementwise op, float32 inside), so it agrees with the stock
module up to the order of float32 sums:

- :func:`rms_norm`: Llama/Qwen2 RMSNorm, ``w * (x * rsqrt(mean(x^2) + eps)).to(dtype)``;
- :func:`rope`: ``x * cos + rotate_half(x) * sin`` for (B, H, L, D) queries or keys;
- :func:`silu_mul`: the SiLU MLP's ``silu(gate) * up``;
- :func:`decode_attention`: softmax attention of one query token per row over its KV
  cache, with grouped-query heads and, for a padded batch, a boolean mask (a masked key is
  skipped, so a row computes what it computes alone).

Each has its pure-torch reference beside it (``*_reference``), the stock code's math.
They are compiled into the extension of :mod:`.cpu_gemv` (one build); where it cannot be
built, or with ``OFFLOAD_CPU_DECODE=0``, :func:`ready` says no and the model keeps
transformers' code (runtime/cpu_decode.py decides).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from . import cpu_gemv

DTYPES = (torch.bfloat16, torch.float32)
_enabled = os.environ.get("OFFLOAD_CPU_DECODE", "") != "0"


def enabled() -> bool:
    """Whether the steps may be used (``OFFLOAD_CPU_DECODE=0`` turns them off)."""
    return _enabled


def set_enabled(flag: bool) -> None:
    """Turn the steps on or off for this process, also in a loaded model (A/B tools, tests)."""
    global _enabled
    _enabled = bool(flag)


def ready() -> bool:
    """Whether the steps can run here (building the extension on the first ask)."""
    return _enabled and cpu_gemv.available()


def _module():
    module = cpu_gemv.load()
    if module is None:
        raise RuntimeError("the CPU kernels are not built here: see the log")
    return module


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _module().rms_norm(x.contiguous(), weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, D) rotated by cos, sin (B, L, D); a new contiguous tensor."""
    return _module().rope(x, cos.contiguous(), sin.contiguous())


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _module().silu_mul(gate.contiguous(), up.contiguous())


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
                     mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q (B, H, 1, D) over keys, values (B, KVH, T, D) -> (B, 1, H * D); ``mask`` bool
    (B, 1, 1, T), true where a key is attended (padding in a batch is false)."""
    return _module().decode_attention(q, keys, values, scale, mask)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    hidden = x.to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(x.dtype)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def decode_attention_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                               scale: float, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    group = q.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(group, dim=1).to(torch.float32)
    values = values.repeat_interleave(group, dim=1).to(torch.float32)
    scores = q.to(torch.float32) @ keys.transpose(2, 3) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return (weights @ values).to(q.dtype).transpose(1, 2).reshape(q.shape[0], 1, -1)


def int4_linear_args(weights, biases) -> tuple:
    """The argument lists :func:`layer_qkv` and :func:`layer_rest` take for prepacked int4
    ``weights`` (kernels/cpu_int4.py's form) and their biases (None where there is none)."""
    return ([w.cpu_weight for w in weights], [w.cpu_scales_zeros for w in weights],
            list(biases), [w.spec.group_size for w in weights],
            [w.out_features for w in weights])


def layer_qkv(hidden: torch.Tensor, norm_weight: torch.Tensor, eps: float, linears: tuple,
              cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> list:
    """A decoder layer's input norm, q/k/v projections and rotary embedding, for one token:
    [query (1, H, 1, D), key (1, KVH, 1, D), value (1, KVH, 1, D)]. ``linears``: from
    :func:`int4_linear_args` for q, k, v."""
    return _module().layer_qkv(hidden, norm_weight, eps, *linears, cos.contiguous(),
                               sin.contiguous(), head_dim)


def layer_rest(hidden: torch.Tensor, query: torch.Tensor, keys: torch.Tensor,
               values: torch.Tensor, scale: float, norm_weight: torch.Tensor, eps: float,
               linears: tuple) -> torch.Tensor:
    """The rest of the layer's step: attention, o projection, residual, post-attention
    norm, SiLU MLP, residual. ``linears``: from :func:`int4_linear_args` for o, gate, up,
    down."""
    return _module().layer_rest(hidden, query, keys, values, scale, norm_weight, eps, *linears)
