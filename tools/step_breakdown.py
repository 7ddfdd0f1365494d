"""Where one eager decode step of the demo model spends its time, part by part.

  python tools/step_breakdown.py                  the demo model, bfloat16, 64 tokens, 2 rounds
  python tools/step_breakdown.py DIR --dtype float32

Wraps the forward of the model's parts with a wall-clock timer and decodes greedily:
each quantized linear (lm_head apart), each attention and MLP block (their linears
included), each norm, each decoder layer, the decoder body and the whole model. A layer
whose weights are resident runs its decode step in two C++ calls (runtime/cpu_decode.py):
its parts then show only for the prefill; ``OFFLOAD_CPU_DECODE=0`` shows transformers' code.
Prints milliseconds per token for each, beside the wall time per token of ``generate``,
so what is left (sampling, the stop checks, the KV cache's growth outside the model)
shows too. The timers add about a microsecond per call; nothing here is profiled by torch.profiler.
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import torch

PROMPT = "The history of the printing press begins"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path, default=None,
                        help="a quantized directory (default: the embedded SmolLM2)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def timed(module, key: str, totals: collections.Counter) -> None:
    forward = module.forward

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return forward(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - started

    module.forward = wrapper


def instrument(model, totals: collections.Counter) -> None:
    from offload_engine.runtime.linear import OffloadedLinear

    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is head:
            timed(module, "lm_head", totals)
        elif isinstance(module, OffloadedLinear):
            timed(module, "linears (lm_head apart)", totals)
        elif name.endswith("self_attn"):
            timed(module, "attention blocks (their linears included)", totals)
        elif name.endswith(".mlp"):
            timed(module, "MLP blocks (their linears included)", totals)
        elif name.endswith("layernorm") or name.endswith(".norm"):
            timed(module, "norms", totals)
        elif name.rpartition(".")[0].endswith("layers") and name.rpartition(".")[2].isdigit():
            timed(module, "decoder layers", totals)
    timed(model.model, "decoder body", totals)
    timed(model, "whole model", totals)


def main(argv=None) -> int:
    from offload_engine import load
    from offload_engine.checkpoint.embedded import ensure_demo_model

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    target = args.model or ensure_demo_model(progress=False)[0]
    totals: collections.Counter = collections.Counter()
    with load(target, progress=False, device="cpu", dtype=args.dtype) as engine:
        instrument(engine.model, totals)
        engine.generate(PROMPT, greedy=True, max_new_tokens=4)  # warm-up
        print(f"{target.name}: --dtype {args.dtype} --cache-format "
              f"{engine.stats['cache_format']}, {args.threads} threads, {args.tokens} greedy "
              "tokens, ms per token (prefill included)")
        for round_ in range(1, args.rounds + 1):
            totals.clear()
            started = time.perf_counter()
            result = engine.generate(PROMPT, greedy=True, max_new_tokens=args.tokens)
            wall = time.perf_counter() - started
            count = result.stats.new_tokens
            parts = ", ".join(f"{key} {seconds * 1e3 / count:.2f}"
                              for key, seconds in totals.most_common())
            print(f"round {round_}: generate {wall * 1e3 / count:.2f} ({count / wall:.1f} "
                  f"tok/s); {parts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
