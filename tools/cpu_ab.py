"""The demo decoded with one CPU code path on and off, alternating, in one process.

  python tools/cpu_ab.py                          the C++ decode steps (OFFLOAD_CPU_DECODE)
  python tools/cpu_ab.py --switch cpu-gemv        our int4 GEMV kernel for one-row steps
                                                  (OFFLOAD_CPU_GEMV=1) against torch's op
  OMP_WAIT_POLICY=PASSIVE python tools/cpu_ab.py  the same with sleeping OpenMP threads

One engine (the embedded SmolLM2, bfloat16 and prepacked on CPU); each round decodes
greedily with the switch on, then off, so both see the same machine load:

- ``decode-steps``: runtime/cpu_decode.py's forwards (one C++ call for each norm, rotary
  embedding, SiLU gate and single-token attention, two for a resident layer) against
  transformers' code;
- ``cpu-gemv``: the gateway's ``cpu-gemv`` path for one-row int4 steps against torch's
  ``_weight_int4pack_mm_for_cpu`` (resident layers then take the per-module steps).

Prints every run, the medians (decode tok/s, measured on this machine), their ratio and
whether the two decoded the same text.
"""

from __future__ import annotations

import argparse
import statistics

PROMPT = "The history of the printing press begins"


def switch(name: str, on: bool) -> None:
    from offload_engine.kernels import cpu_decode, gateway

    if name == "decode-steps":
        cpu_decode.set_enabled(on)
    else:
        gateway._cpu_gemv_enabled = on


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--switch", choices=("decode-steps", "cpu-gemv"), default="decode-steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args(argv)

    import torch

    from offload_engine import load
    from offload_engine.checkpoint.embedded import ensure_demo_model

    torch.set_num_threads(args.threads)
    directory, _ = ensure_demo_model(progress=False)
    rates, texts = {"on": [], "off": []}, {}
    with load(directory, progress=False, device="cpu") as engine:
        engine.generate(PROMPT, greedy=True, max_new_tokens=8)  # warm-up (and the build)
        for _ in range(args.rounds):
            for label in rates:
                switch(args.switch, label == "on")
                result = engine.generate(PROMPT, greedy=True, max_new_tokens=args.tokens)
                rates[label].append(result.stats.decode_tokens_per_s)
                texts[label] = result.text
    switch(args.switch, args.switch == "decode-steps")  # back to the defaults
    for label, values in rates.items():
        print(f"{args.switch} {label}: {statistics.median(values):.2f} tok/s median (runs "
              f"{' '.join(f'{v:.1f}' for v in values)})")
    ratio = statistics.median(rates["on"]) / statistics.median(rates["off"])
    print(f"ratio on/off: {ratio:.2f}x; same text: {texts['on'] == texts['off']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
