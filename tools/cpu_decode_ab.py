"""The demo decoded with the C++ decode steps on and off, alternating, in one process.

  python tools/cpu_decode_ab.py                 2 threads, 6 rounds of 48 tokens
  python tools/cpu_decode_ab.py --dtype float32

One engine (the embedded SmolLM2, bfloat16 and prepacked on CPU by default); each round
decodes greedily with runtime/cpu_decode.py's forwards on (one C++ call for each norm,
rotary embedding, SiLU gate and single-token attention), then off (transformers' code),
so both see the same machine load. Prints every run, the medians (decode tok/s, measured
on this machine) and whether the two decoded the same tokens.
"""

from __future__ import annotations

import argparse
import statistics

PROMPT = "The history of the printing press begins"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)

    import torch

    from offload_engine import load
    from offload_engine.checkpoint.embedded import ensure_demo_model
    from offload_engine.kernels import cpu_decode

    torch.set_num_threads(args.threads)
    directory, _ = ensure_demo_model(progress=False)
    rates = {"on": [], "off": []}
    tokens = {}
    with load(directory, progress=False, device="cpu", dtype=args.dtype) as engine:
        engine.generate(PROMPT, greedy=True, max_new_tokens=8)  # warm-up (and the build)
        for _ in range(args.rounds):
            for label in rates:
                cpu_decode.set_enabled(label == "on")
                result = engine.generate(PROMPT, greedy=True, max_new_tokens=args.tokens)
                rates[label].append(result.stats.decode_tokens_per_s)
                tokens[label] = result.text
    cpu_decode.set_enabled(True)
    for label, values in rates.items():
        print(f"decode steps {label}: {statistics.median(values):.2f} tok/s median (runs "
              f"{' '.join(f'{v:.1f}' for v in values)})")
    print(f"ratio on/off: {statistics.median(rates['on']) / statistics.median(rates['off']):.2f}x; "
          f"same text: {tokens['on'] == tokens['off']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
