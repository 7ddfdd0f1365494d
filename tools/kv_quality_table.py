"""What an int8/int4 KV cache costs on the embedded SmolLM2: quality and decode step time.

    python tools/kv_quality_table.py [MODEL] [--variants int8:32,int4:32,k8v4:32]
                                     [--tokens 4096] [--window 2048] [--steps 32]

MODEL is a directory written by `quantize`; default: the demo conversion of the shipped
SmolLM2-135M-Instruct GGUF (converted once under embedded.cache_root()). The same engine
scores every variant against its own dense cache (the compute dtype: float32 on CPU) on
the same windows (see quality/kv_eval.py), then times decode steps at a context of
--window tokens for bf16, int8 and int4. A variant is MODE[:GROUP]: int8, int4, k8v4
(keys int8, values int4) or k4v8 (the other split), with GROUP elements of the head dim per scale.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_VARIANTS = "int8:32,int8:64,int4:32,int4:64,k8v4:32,k4v8:32"


def parse_args(argv=None) -> argparse.Namespace:
    from offload_engine.cli.options import add_engine_args

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, nargs="?", default=None,
                        help="a quantized directory (default: the demo model)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help=f"comma-separated MODE[:GROUP] (default {DEFAULT_VARIANTS}); "
                             "empty: timings only")
    parser.add_argument("--tokens", type=int, default=4096, metavar="N")
    parser.add_argument("--window", type=int, default=2048, metavar="N",
                        help="tokens per window, and the context of the timed decode steps")
    parser.add_argument("--greedy-tokens", type=int, default=64, metavar="N")
    parser.add_argument("--steps", type=int, default=32, metavar="N",
                        help="decode steps timed per mode (0: skip the timing)")
    parser.add_argument("--json-out", type=Path, default=None, metavar="FILE")
    add_engine_args(parser)
    return parser.parse_args(argv)


def layouts_for(engine, variants: str) -> list:
    import dataclasses

    from offload_engine.errors import ConfigError
    from offload_engine.planning.kv_sizes import KV_GROUP_SIZE

    layouts = []
    for item in filter(None, variants.split(",")):  # --variants "": timings only
        mode, _, group = item.strip().partition(":")
        if group and not group.isdigit():
            raise ConfigError(f"--variants {item!r}: write MODE[:GROUP], e.g. int4:32")
        layouts.append(dataclasses.replace(engine.kv_layout, mode=mode,
                                           group=int(group or KV_GROUP_SIZE)))
    return layouts


def quality_table(reports) -> str:
    lines = ["| KV cache | group | bytes/token | of dense | perplexity | dense perplexity "
             "| perplexity increase | mean KL (nats) | top-1 agreement | greedy before "
             "divergence |", "|" + "---|" * 10]
    for r in reports:
        lines.append(
            f"| {r.kv_cache} | {r.group_size} | {r.bytes_per_token} "
            f"| {r.bytes_per_token / r.dense_bytes_per_token:.1%} | {r.perplexity:.4f} "
            f"| {r.dense_perplexity:.4f} | {r.perplexity_increase:+.2%} | {r.mean_kl:.5f} "
            f"| {r.top1_agreement:.2%} | {r.greedy_matching} of {r.greedy_tokens} |")
    return "\n".join(lines)


def time_decode(engine, mode: str, context: int, steps: int) -> dict:
    """Fastest and median seconds of one decode step after a prefill of ``context`` tokens.

    The fastest step is the one least disturbed by other work on a shared machine.
    """
    import dataclasses
    import statistics

    import torch

    from offload_engine.model.cache_arg import cache_kwargs, output_cache
    from offload_engine.runtime.kv_cache import new_kv_cache

    layout = dataclasses.replace(engine.kv_layout, mode=mode)
    ids = torch.randint(0, engine.model.config.vocab_size, (1, context),
                        generator=torch.Generator().manual_seed(0)).to(engine.device)
    cache = new_kv_cache(layout)
    times = []
    with torch.inference_mode():
        out = engine.model(input_ids=ids, use_cache=True, **cache_kwargs(engine.model, cache))
        past, token = output_cache(out), out.logits[:, -1:].argmax(-1)
        read_before = cache.counters.read_bytes if cache is not None else 0
        for _ in range(steps):
            started = time.perf_counter()
            out = engine.model(input_ids=token, use_cache=True, **cache_kwargs(engine.model, past))
            token = out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - started)
    if cache is not None:  # counted by the cache
        held, read = past.nbytes, (cache.counters.read_bytes - read_before) / steps
    else:  # the dense cache holds every token, and attention reads all of them every step
        held = layout.token_bytes() * (context + steps)
        read = layout.token_bytes() * (context + (steps + 1) / 2)
    return dict(kv_cache=mode, context=context, step_ms_fastest=min(times) * 1e3,
                cache_update_ms=time_cache_updates(layout, context),
                step_ms_median=statistics.median(times) * 1e3, kv_bytes_held=held,
                kv_bytes_per_token=layout.token_bytes(), kv_bytes_read_per_step=read)


def time_cache_updates(layout, context: int, repeats: int = 20) -> float:
    """Fastest milliseconds to append one token to every layer at ``context`` and get back
    each layer's keys and values: the cache's own work per decode step, without the model.
    """
    import torch
    from transformers.cache_utils import DynamicCache

    from offload_engine.runtime.kv_cache import new_kv_cache

    dtype = {4: torch.float32, 2: torch.bfloat16}[layout.dense_itemsize]
    generator = torch.Generator().manual_seed(0)
    prefill = torch.randn((1, layout.kv_heads, context, layout.head_dim), generator=generator,
                          dtype=torch.float32).to(dtype)
    token = prefill[:, :, -1:].clone()
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            cache = new_kv_cache(layout) or DynamicCache()
            for index in range(layout.num_layers):
                cache.update(prefill, prefill, index)
            started = time.perf_counter()
            for index in range(layout.num_layers):
                cache.update(token, token, index)
            best = min(best, time.perf_counter() - started)
    return best * 1e3


def speed_table(rows) -> str:
    lines = ["| KV cache | context | decode step, fastest (ms) | median (ms) | cache update, all "
             "layers (ms) | KV bytes/token | KV bytes held | KV bytes read per step |",
             "|" + "---|" * 8]
    lines += [f"| {r['kv_cache']} | {r['context']} | {r['step_ms_fastest']:.1f} "
              f"| {r['step_ms_median']:.1f} | {r['cache_update_ms']:.2f} "
              f"| {r['kv_bytes_per_token']} | {r['kv_bytes_held']} "
              f"| {r['kv_bytes_read_per_step']:.0f} |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    from offload_engine.checkpoint.embedded import ensure_demo_model
    from offload_engine.cli.options import engine_config_from_args
    from offload_engine.decode.api import load
    from offload_engine.errors import OffloadError
    from offload_engine.quality.evaluate import EvalSettings
    from offload_engine.quality.kv_eval import evaluate_kv_layouts

    args = parse_args(argv)
    try:
        config = engine_config_from_args(args)
        settings = EvalSettings(tokens=args.tokens, window=args.window,
                                greedy_tokens=args.greedy_tokens)
        directory = args.model or ensure_demo_model(progress=config.progress)[0]
        with load(directory, config) as engine:
            layouts = layouts_for(engine, args.variants)
            reports = evaluate_kv_layouts(engine, layouts, None, settings,
                                          config.progress) if layouts else []
            speeds = [time_decode(engine, mode, args.window, args.steps)
                      for mode in ("bf16", "int8", "k8v4", "int4")] if args.steps else []
    except OffloadError as exc:
        print(f"kv_quality_table: error: {exc}", file=sys.stderr)
        return 2
    if reports:
        first = reports[0]
        print(f"{directory.name}: {first.tokens} tokens of pydoc_data.topics in "
              f"{first.windows} window(s) of {first.window}, dense cache {first.dense_dtype}, "
              f"{first.device}, {time.strftime('%Y-%m-%d')}\n")
        print(quality_table(reports))
    if speeds:
        print(f"\n{directory.name}: decode steps on {config.torch_device()} (CPU timings "
              "when the device is cpu)\n")
        print(speed_table(speeds))
    if args.json_out is not None:
        args.json_out.write_text(json.dumps({"quality": [r.as_dict() for r in reports],
                                             "speed": speeds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
