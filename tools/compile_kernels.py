"""Compile the Triton kernels for a GPU target on a machine without a GPU.

  python tools/compile_kernels.py [--arch 90]

The tests run the kernels in triton's CPU interpreter, which executes the jit functions as
Python and so accepts code the compiler may not (a constexpr branch, a bitcast, a
captured global). This compiles every kernel variant the gateway launches (decode with one
row and with 16, prefill dequantization; our layout and each raw GGUF block type) through
triton's CUDA backend to a cubin, which needs triton's bundled ptxas but no driver or GPU,
and exits 1 if any fails. It says nothing about speed.
"""

from __future__ import annotations

import argparse
import os
import sys


def variants():
    """(label, kernel name, block constexprs, group, offset mode, rows) of every variant."""
    from offload_engine.quant.block_formats import FORMATS

    layouts = [("int4-asym g128", 0, 0, 128, 1)] + [
        (fmt.ggml_type, fmt.kernel_code, fmt.block_bytes, fmt.block_elements, 0)
        for fmt in FORMATS.values()]
    for label, blocks, block_bytes, group, offset in layouts:
        for kernel, rows in (("gemv", 1), ("gemv", 16), ("dequant", None)):
            yield label, kernel, blocks, block_bytes, group, offset, rows


def compile_variant(kernel: str, blocks: int, block_bytes: int, group: int, offset: int,
                    rows, arch: int) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from offload_engine.kernels import triton_dequant, triton_gemv

    side = "*u8" if blocks else "*bf16"  # raw blocks have no scales: qweight stands in
    const = {"GROUP": group, "BITS": 4, "OFFSET": offset, "BLOCK_N": 32, "BLOCK_K": 256,
             "BLOCKS": blocks, "BLOCK_BYTES": block_bytes}
    if kernel == "gemv":
        fn = triton_gemv._gemv_kernel
        signature = {"x_ptr": "*bf16", "q_ptr": "*u8", "s_ptr": side, "z_ptr": side,
                     "b_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
                     "padded_in": "i32", "n_groups": "i32", "stride_xm": "i32",
                     "k_per_split": "i32", "stride_ys": "i32"}
        const.update(HAS_BIAS=True, BLOCK_M=rows, DOT_FP32=False)
    else:
        fn = triton_dequant._dequant_kernel
        signature = {"q_ptr": "*u8", "s_ptr": side, "z_ptr": side, "out_ptr": "*bf16",
                     "N": "i32", "K": "i32", "padded_in": "i32", "n_groups": "i32"}
    signature.update({name: "constexpr" for name in const})
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=const),
                   target=GPUTarget("cuda", arch, 32))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability (90)")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # read when the kernels are defined
    failed = 0
    for label, kernel, blocks, block_bytes, group, offset, rows in variants():
        name = f"{kernel} {label}" + (f" M<={rows}" if rows else "")
        try:
            compile_variant(kernel, blocks, block_bytes, group, offset, rows, args.arch)
            print(f"ok      {name}")
        except Exception as exc:  # noqa: BLE001  (any compiler failure is reported)
            failed += 1
            print(f"FAILED  {name}: {exc!r}"[:2000])
    print(f"{failed} of {len(list(variants()))} variants failed for sm_{args.arch}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
