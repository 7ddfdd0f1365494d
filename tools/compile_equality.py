"""--compile against eager on the demo model: greedy tokens, and why bfloat16 differs.

  python tools/compile_equality.py                       float32, bf16 and int8 KV, two budgets
  python tools/compile_equality.py --dtype bfloat16 --tokens 32

For each KV cache mode and budget (unbounded, and one that streams), loads the demo model
eagerly and with ``--compile``, decodes the same prompt greedily and prints whether the
tokens are identical (and where they first differ). Then it prints what the compiled
step's attention changes on its own: torch's CPU ``scaled_dot_product_attention`` in the
compute dtype over a key length padded to the static cache's bucket (the padding masked)
against the same attention over the true length, the case eager runs.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

PROMPT = "The history of the printing press begins"
BUCKET = 256  # the static cache's first bucket (runtime/kv_static.py)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--kv-cache", nargs="+", default=["bf16", "int8"])
    parser.add_argument("--budgets", nargs="+", default=["unbounded", "200MiB"],
                        help="device budgets; 200MiB streams the float32 demo model")
    return parser.parse_args(argv)


def decode(target, dtype: str, compile_: bool, kv: str, budget, tokens: int):
    from offload_engine import load

    started = time.perf_counter()
    with load(target, progress=False, device="cpu", dtype=dtype, compile=compile_,
              kv_cache=kv, gpu_budget=budget) as engine:
        result = engine.generate(PROMPT, greedy=True, max_new_tokens=tokens)
    return result.token_ids, result.stats.h2d_bytes_per_token, time.perf_counter() - started


def first_difference(eager, compiled) -> int:
    pairs = zip(eager, compiled, strict=False)
    return next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(eager), len(compiled)))


def compare_tokens(args, target) -> None:
    for kv in args.kv_cache:
        for name in args.budgets:
            budget = None if name == "unbounded" else name
            eager, h2d, eager_s = decode(target, args.dtype, False, kv, budget, args.tokens)
            compiled, _, compiled_s = decode(target, args.dtype, True, kv, budget, args.tokens)
            verdict = ("identical" if eager == compiled else
                       f"differ from token {first_difference(eager, compiled)}")
            print(f"--dtype {args.dtype} --kv-cache {kv} --gpu-budget {name}: {len(eager)} "
                  f"tokens {verdict} (host->device {h2d / 2**20:.2f} MiB/token; eager "
                  f"{eager_s:.0f} s, compiled {compiled_s:.0f} s with compiling)", flush=True)


def padded_attention_difference(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    for length in (10, 40, 75, 200):
        q = torch.randn(1, 9, 1, 64, dtype=dtype)
        k, v = (torch.randn(1, 9, length, 64, dtype=dtype) for _ in range(2))
        exact = F.scaled_dot_product_attention(q, k, v)
        k_pad, v_pad = (F.pad(t, (0, 0, 0, BUCKET - length)) for t in (k, v))
        mask = torch.arange(BUCKET).view(1, 1, 1, BUCKET) < length
        padded = F.scaled_dot_product_attention(q, k_pad, v_pad, attn_mask=mask)
        print(f"  {dtype}: keys {length} vs padded to {BUCKET} (masked): max |difference| "
              f"{(exact.float() - padded.float()).abs().max().item():.3g}")


def main(argv=None) -> int:
    from offload_engine.checkpoint.embedded import ensure_demo_model

    args = parse_args(argv)
    target, _ = ensure_demo_model(progress=False)
    print(f"demo model, {args.tokens} greedy tokens, prompt {PROMPT!r}; CPU, "
          f"{torch.get_num_threads()} threads")
    compare_tokens(args, target)
    print("attention alone (torch's CPU scaled_dot_product_attention, 9 heads, head dim 64):")
    for dtype in (torch.float32, torch.bfloat16):
        padded_attention_difference(dtype)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
