"""The demo decoded with the C++ CPU GEMV kernel on and off, alternating, in one process.

  python tools/cpu_gemv_ab.py                         2 threads, 6 rounds of 48 tokens
  OMP_WAIT_POLICY=PASSIVE python tools/cpu_gemv_ab.py the same with sleeping OpenMP threads

One engine (the embedded SmolLM2, `--dtype auto`: bfloat16 and prepacked on CPU); each
round decodes greedily with the gateway's `cpu-gemv` path on, then off (torch's
`_weight_int4pack_mm_for_cpu` for every row), so both see the same machine load.
Prints every run and the medians (decode tok/s, measured on this machine).
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
    args = parser.parse_args(argv)

    import torch

    from offload_engine import load
    from offload_engine.checkpoint.embedded import ensure_demo_model
    from offload_engine.kernels import gateway

    torch.set_num_threads(args.threads)
    directory, _ = ensure_demo_model(progress=False)
    rates = {"on": [], "off": []}
    with load(directory, progress=False, device="cpu") as engine:
        engine.generate(PROMPT, greedy=True, max_new_tokens=8)  # warm-up (and the build)
        for _ in range(args.rounds):
            for label in rates:
                gateway._cpu_gemv_enabled = label == "on"
                result = engine.generate(PROMPT, greedy=True, max_new_tokens=args.tokens)
                rates[label].append(result.stats.decode_tokens_per_s)
    for label, values in rates.items():
        print(f"cpu-gemv {label}: {statistics.median(values):.2f} tok/s median (runs "
              f"{' '.join(f'{v:.1f}' for v in values)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
