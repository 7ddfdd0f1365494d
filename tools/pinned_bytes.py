"""Host memory pinned for a model's weights: torch's pinned allocator against ours (computed).

  python tools/pinned_bytes.py [MODEL] [--scheme int4-asym] [--group-size 128]

MODEL is a built-in name (as for `offload-engine synth`, default qwen2.5-32b), a
config.json or a model directory. torch's ``pin_memory()`` rounds every allocation up to
the next power of two (ATen CachingHostAllocator, ``PowerOf2Ceil``); the engine pins one
buffer of the exact size, each tensor aligned to 512 bytes (runtime/pinned.py). Counts
bytes from the shapes alone: nothing is allocated.
"""

from __future__ import annotations

import argparse
import math

from offload_engine.checkpoint.synth import resolve_config
from offload_engine.model.model_shape import shape_from_config
from offload_engine.quant.layout import QuantSpec
from offload_engine.runtime.pinned import aligned


def power_of_two(nbytes: int) -> int:
    return 1 << (nbytes - 1).bit_length() if nbytes else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="qwen2.5-32b")
    parser.add_argument("--scheme", default="int4-asym")
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args(argv)
    config, label = resolve_config(args.model)
    spec = QuantSpec(args.scheme, args.group_size)
    shape = shape_from_config(config, spec, "pinned_bytes")
    exact = torch_pinned = ours = 0
    for linear in shape.linears:
        for dims, dtype in spec.component_shapes(linear.out_features,
                                                 linear.in_features).values():
            nbytes = math.prod(dims) * dtype.itemsize
            exact += nbytes
            torch_pinned += power_of_two(nbytes)
            ours += aligned(nbytes)
    print(f"{label}, {args.scheme} g{args.group_size}: quantized weights {exact / 1e9:.2f} GB")
    print(f"  pinned by pin_memory() per tensor: {torch_pinned / 1e9:.2f} GB "
          f"({torch_pinned / exact:.2f}x)")
    print(f"  pinned by the engine (one buffer): {ours / 1e9:.2f} GB ({ours / exact:.4f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
