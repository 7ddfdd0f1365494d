"""llama.cpp and offload-engine decoding the same GGUF on this CPU, side by side.

  python tools/llamacpp_side_by_side.py                 the demo GGUF (SmolLM2-135M Q4_1)
  python tools/llamacpp_side_by_side.py --threads 2 --tokens 64 --runs 3 --dtype bfloat16

llama.cpp runs through llama-cpp-python, installed on first use into its own virtual
environment (--venv, default .venv-llamacpp, gitignored): ``pip install llama-cpp-python``
builds llama.cpp from source, about 9 minutes on our 2-core machine. Its model is loaded
with ``use_extra_bufts=False``: the AMX/extra-buffer repack path crashed on this CPU.

offload-engine runs the same GGUF imported exactly (the demo conversion, int4-min g32 fp16
scales) with the same thread count. Both decode greedily from the same text prompt; runs
alternate (llama.cpp, engine, llama.cpp, ...) so that a neighbour's load hits both alike.
Decode tok/s = (tokens - 1) / (time of the last token - time of the first), for both.
Prints each run, the medians and the ratio engine / llama.cpp.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The history of the printing press begins"

# Runs in the llama-cpp-python venv: loads the model once, then answers one JSON line per
# "run" line on stdin.
WORKER = textwrap.dedent("""
    import json, sys, time
    import llama_cpp
    path, threads, tokens, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    params = llama_cpp.llama_model_default_params()
    kwargs = {}
    if hasattr(params, "use_extra_bufts"):  # the AMX repack path crashes on this CPU
        kwargs["use_extra_bufts"] = False
    llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads,
                          n_ctx=512, verbose=False, **kwargs)
    ids = llm.tokenize(prompt.encode(), add_bos=True)
    print(json.dumps({"ready": True, "version": llama_cpp.__version__}), flush=True)
    for line in sys.stdin:
        llm.reset()
        stamps, out = [], []
        for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            stamps.append(time.perf_counter())
            out.append(token)
            if len(out) >= tokens:
                break
        rate = (len(out) - 1) / (stamps[-1] - stamps[0]) if len(out) > 1 else 0.0
        print(json.dumps({"tokens": len(out), "tok_s": rate, "ids": out}), flush=True)
""")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", default=None, help="GGUF file (default: the embedded demo)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per run")
    parser.add_argument("--runs", type=int, default=3, help="runs of each, alternating")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="offload-engine compute dtype: bfloat16 takes the CPU int4 "
                             "kernel (cache format prepacked), float32 the dequantized "
                             "float32 weights (default bfloat16)")
    parser.add_argument("--venv", default=str(ROOT / ".venv-llamacpp"),
                        help="virtual environment holding llama-cpp-python")
    return parser.parse_args(argv)


def ensure_llamacpp(venv: Path) -> Path:
    """The venv's python, with llama-cpp-python installed (built from source if missing)."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    found = subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True)
    if found.returncode != 0:
        print("installing llama-cpp-python (builds llama.cpp from source: ~9 minutes on 2 "
              "cores)", flush=True)
        subprocess.run([str(python), "-m", "pip", "install", "llama-cpp-python"], check=True)
    return python


class LlamaWorker:
    """llama.cpp in a child process of the other venv, one generation per request."""

    def __init__(self, python: Path, gguf: Path, threads: int, tokens: int):
        self.proc = subprocess.Popen(
            [str(python), "-c", WORKER, str(gguf), str(threads), str(tokens), PROMPT],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.version = self._read()["version"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the llama.cpp worker exited (code {self.proc.wait()})")
        return json.loads(line)

    def run(self) -> dict:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def load_engine(gguf: Path, threads: int, dtype: str):
    import torch

    from offload_engine import load
    from offload_engine.checkpoint.convert import convert
    from offload_engine.checkpoint.embedded import DEMO_SPEC, cache_root, ensure_demo_model

    torch.set_num_threads(threads)
    if gguf is None:
        directory, _ = ensure_demo_model(progress=False)
    else:
        directory = cache_root() / f"side-by-side-{gguf.stem}"
        if not directory.is_dir():
            convert(gguf, directory, DEMO_SPEC, progress=False)
    return load(directory, progress=False, device="cpu", dtype=dtype)


def leading_equal(first, second) -> int:
    """How many tokens the two greedy runs share before they first differ."""
    count = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        count += 1
    return count


def main(argv=None) -> int:
    args = parse_args(argv)
    from offload_engine.checkpoint.embedded import embedded_gguf

    gguf = Path(args.gguf) if args.gguf else embedded_gguf()
    python = ensure_llamacpp(Path(args.venv))
    engine = load_engine(Path(args.gguf) if args.gguf else None, args.threads, args.dtype)
    worker = LlamaWorker(python, gguf, args.threads, args.tokens)
    print(f"{gguf.name}: {args.threads} threads, greedy, {args.tokens} new tokens, prompt "
          f"{PROMPT!r}; llama-cpp-python {worker.version}; offload-engine --dtype {args.dtype} "
          f"--cache-format {engine.stats['cache_format']}; OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', 'unset')} (PASSIVE slows llama.cpp more than "
          "us: docs/performance.md) (measured on this machine)")
    ours, theirs = [], []
    try:
        engine.generate(PROMPT, greedy=True, max_new_tokens=4)  # warm-up, not timed
        worker.run()
        for run in range(args.runs):
            llama = worker.run()
            theirs.append(llama["tok_s"])
            result = engine.generate(PROMPT, greedy=True, max_new_tokens=args.tokens)
            ours.append(result.stats.decode_tokens_per_s)
            same = leading_equal(llama["ids"], result.token_ids)
            print(f"run {run + 1}: llama.cpp {llama['tok_s']:.1f} tok/s ({llama['tokens']} "
                  f"tokens), offload-engine {ours[-1]:.1f} tok/s ({result.stats.new_tokens} "
                  f"tokens; first {same} of them equal llama.cpp's)", flush=True)
    finally:
        worker.close()
        engine.close()
    llama_median, ours_median = statistics.median(theirs), statistics.median(ours)
    print(f"median: llama.cpp {llama_median:.1f} tok/s, offload-engine {ours_median:.1f} tok/s, "
          f"ratio {ours_median / llama_median:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
