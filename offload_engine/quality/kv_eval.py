"""What an int8/int4 KV cache costs, measured against the dense cache of the same engine.

The same loaded engine (same quantized weights) scores the same windows twice: once with
no cache (attention over the exact keys and values, in the compute dtype) and once
through a fresh QuantizedKVCache, whose prefill quantizes every token and hands attention
the dequantized layer, exactly as decoding reads it. Position t of a window therefore
attends over t quantized tokens: a window of 2048 tokens measures contexts up to 2048.
We report the mean KL(dense || quantized), top-1 agreement, both perplexities, and the
greedy tokens both produce from a prompt before the first difference.

The dense side is the compute dtype: bfloat16 on CUDA, float32 on CPU.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass
from typing import List, Optional

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..model.cache_arg import cache_kwargs
from ..planning.kv_sizes import KV_GROUP_SIZE, KVLayout
from ..runtime.kv_cache import QuantizedKVCache
from .evaluate import (
    EvalSettings,
    _GreedyStepper,
    _Totals,
    eval_inputs,
    matching_greedy_steps,
    windows_of,
)

SCORE_SLICE = 256  # positions per log-softmax: caps float32 temporaries at 256 x vocab


@dataclass
class KVEvalReport:
    """The numbers of one KV cache evaluation."""

    model: str  # the quantized directory
    kv_cache: str  # int8, k8v4, int4 (or k4v8, measured by tools/)
    group_size: int  # elements of the head dim per scale/minimum
    bytes_per_token: int  # the quantized cache, all layers, K and V
    dense_bytes_per_token: int  # the dense cache in the compute dtype
    dense_dtype: str  # what "dense" means here (float32 on CPU)
    tokens: int
    predictions: int
    windows: int
    window: int  # tokens per window: the longest context measured
    perplexity: float  # with the quantized cache
    dense_perplexity: float
    perplexity_increase: float
    mean_kl: float  # mean KL(dense || quantized), nats per token
    top1_agreement: float
    greedy_matching: int
    greedy_tokens: int
    device: str
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)

    def render(self) -> str:
        rows = [
            ("model", self.model),
            ("KV cache", f"{self.kv_cache}, group {self.group_size}: {self.bytes_per_token} "
                         f"bytes/token vs {self.dense_bytes_per_token} dense "
                         f"({self.dense_dtype}), "
                         f"{self.bytes_per_token / self.dense_bytes_per_token:.1%}"),
            ("text", f"{self.tokens} tokens, {self.windows} window(s) of up to {self.window}, "
                     f"{self.predictions} predictions"),
            ("perplexity", f"{self.perplexity:.4f} (dense cache {self.dense_perplexity:.4f}, "
                           f"{self.perplexity_increase:+.2%})"),
            ("mean KL", f"{self.mean_kl:.6f} nats/token vs the dense cache"),
            ("top-1 agreement", f"{self.top1_agreement:.2%}"),
            ("greedy", f"{self.greedy_matching} of {self.greedy_tokens} tokens identical "
                       "before the first difference"),
            ("time", f"{self.seconds:.1f} s on {self.device}"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def kv_layout_for_eval(engine, mode: str, group: int = KV_GROUP_SIZE) -> KVLayout:
    layout = dataclasses.replace(engine.kv_layout, mode=mode, group=group)
    if not layout.quantized:
        raise ConfigError("eval measures --kv-cache int8, k8v4 or int4 against the dense cache; "
                          f"--kv-cache {mode} is the dense cache itself")
    return layout


@torch.inference_mode()
def score_kv(engine, layouts: List[KVLayout], ids: torch.Tensor, window: int,
             progress: bool) -> List[_Totals]:
    """Totals of each layout against the dense cache; the dense pass runs once per window."""
    totals = [_Totals() for _ in layouts]
    for piece in tqdm(windows_of(ids, window), desc="scoring KV caches", unit="window",
                      disable=not progress):
        chunk = piece[None].to(engine.device)  # (1, T)
        dense = engine.model(input_ids=chunk, use_cache=False).logits.cpu()
        targets = piece[None, 1:]
        for layout, total in zip(layouts, totals, strict=True):
            quantized = engine.model(input_ids=chunk,
                                     **cache_kwargs(engine.model, QuantizedKVCache(layout)),
                                     use_cache=True).logits.cpu()
            for start in range(0, targets.shape[1], SCORE_SLICE):
                end = min(start + SCORE_SLICE, targets.shape[1])
                total.add(quantized[:, start:end], dense[:, start:end], targets[:, start:end])
    return totals


@torch.inference_mode()
def greedy_kv_agreement(engine, layout: KVLayout, prompt: torch.Tensor, steps: int) -> int:
    """Greedy tokens the dense and the quantized cache produce before the first difference."""
    if steps == 0:
        return 0
    dense = _GreedyStepper(engine.model, engine.device)
    quantized = _GreedyStepper(engine.model, engine.device)
    quantized.past = QuantizedKVCache(layout)
    return matching_greedy_steps(dense, quantized, prompt, steps)


def evaluate_kv_cache(engine, mode: str, text: Optional[str] = None,
                      settings: Optional[EvalSettings] = None,
                      progress: bool = True) -> KVEvalReport:
    """Score ``engine`` with a ``mode`` KV cache against its own dense cache."""
    layout = kv_layout_for_eval(engine, mode)
    return evaluate_kv_layouts(engine, [layout], text, settings, progress)[0]


def evaluate_kv_layouts(engine, layouts: List[KVLayout], text: Optional[str] = None,
                        settings: Optional[EvalSettings] = None,
                        progress: bool = True) -> List[KVEvalReport]:
    """One report per layout (modes, group sizes, K/V splits), all on the same tokens."""
    settings = settings or EvalSettings()
    started = time.perf_counter()
    ids, window, prompt, steps = eval_inputs(engine, text, settings)
    all_totals = score_kv(engine, layouts, ids, window, progress)
    reports = []
    for layout, totals in zip(layouts, all_totals, strict=True):
        perplexity = math.exp(totals.nll / totals.count)
        dense_perplexity = math.exp(totals.reference_nll / totals.count)
        dense = dataclasses.replace(layout, mode="bf16")
        reports.append(KVEvalReport(
            model=str(engine.directory), kv_cache=layout.mode, group_size=layout.group_size,
            bytes_per_token=layout.token_bytes(), dense_bytes_per_token=dense.token_bytes(),
            dense_dtype=str(engine.config.torch_dtype()).replace("torch.", ""),
            tokens=ids.shape[1], predictions=totals.count,
            windows=len(windows_of(ids, window)), window=window, perplexity=perplexity,
            dense_perplexity=dense_perplexity,
            perplexity_increase=perplexity / dense_perplexity - 1,
            mean_kl=totals.kl / totals.count, top1_agreement=totals.agree / totals.count,
            greedy_matching=greedy_kv_agreement(engine, layout, prompt, steps),
            greedy_tokens=steps, device=str(engine.device),
            seconds=time.perf_counter() - started,
        ))
    return reports
