"""Write a GGUF file with llama.cpp's own quantizer (through llama-cpp-python).

  PYTHON_WITH_LLAMA_CPP tools/llamacpp_quantize.py SRC.gguf DST.gguf Q4_K_M [--threads 2]

An independent source of K-quant files for checking the exact GGUF import: llama.cpp
picks each tensor's type (Q4_K_M mixes Q4_K, Q6_K and, where a row is not a whole
256-element super-block, Q5_0/Q8_0) and writes the blocks with its own searches. SRC may
itself be quantized (the demo model's Q4_1 GGUF): ``allow_requantize`` is set, so the
result is a faithful Q4_K_M *of those values*, not of the original float model.

This script imports only llama_cpp, so it runs under any interpreter that has it (for
example a separate virtual environment); offload-engine is not needed there.
"""

from __future__ import annotations

import argparse
import ctypes
import sys

TYPES = ("Q2_K", "Q3_K_M", "Q3_K_S", "Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K", "Q8_0",
         "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("type", choices=TYPES, help="llama.cpp file type (e.g. Q4_K_M)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        print("llama_cpp is not importable here: run this with the python of an environment "
              "that has llama-cpp-python", file=sys.stderr)
        return 2
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{args.type}")
    params.allow_requantize = True
    params.nthread = args.threads
    code = llama_cpp.llama_model_quantize(args.src.encode(), args.dst.encode(),
                                          ctypes.byref(params))
    if code != 0:
        print(f"llama_model_quantize failed with {code}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst} ({args.type}, by llama.cpp's quantizer)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
