"""How close bfloat16 decode stays to float32, with the C++ decode steps and without.

  python tools/cpu_decode_quality.py                  the demo model, 200 tokens
  python tools/cpu_decode_quality.py --tokens 400 --topic class

Teacher-forced decode, one token per forward through a KV cache (the path the C++ decode
attention takes), over a CPython documentation topic (``pydoc_data.topics``): the demo
model in float32 (transformers' code: the steps are bfloat16 only) is the reference; the
same model in bfloat16 runs with kernels/cpu_decode.py's steps on, then off. Prints the
perplexity of each, the mean KL divergence from float32 and how often the top token agrees.
"""

from __future__ import annotations

import argparse

import torch


def decode_logits(engine, ids: torch.Tensor) -> torch.Tensor:
    """The logits of each next token, fed one token per forward."""
    from transformers import DynamicCache

    cache, logits = DynamicCache(config=engine.model.config), []
    with torch.inference_mode():
        for position in range(len(ids) - 1):
            out = engine.model(input_ids=ids[position:position + 1].view(1, 1), cache=cache,
                               use_cache=True)
            logits.append(out.logits[0, -1].float())
    return torch.stack(logits)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--topic", default="class", help="a key of pydoc_data.topics.topics")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    from pydoc_data.topics import topics

    from offload_engine import load
    from offload_engine.checkpoint.embedded import ensure_demo_model
    from offload_engine.kernels import cpu_decode

    torch.set_num_threads(args.threads)
    directory, _ = ensure_demo_model(progress=False)
    runs = {}
    with load(directory, progress=False, device="cpu", dtype="float32") as engine:
        ids = engine.tokenizer(topics[args.topic], return_tensors="pt")["input_ids"][0]
        ids = ids[: args.tokens + 1]
        runs["float32 (transformers' code)"] = decode_logits(engine, ids)
    with load(directory, progress=False, device="cpu", dtype="bfloat16") as engine:
        for label, enabled in (("bfloat16, C++ decode steps", True),
                               ("bfloat16, transformers' code", False)):
            cpu_decode.set_enabled(enabled)
            runs[label] = decode_logits(engine, ids)
    cpu_decode.set_enabled(True)
    reference = torch.log_softmax(next(iter(runs.values())), dim=-1)
    targets = ids[1:].view(-1, 1)
    print(f"demo model, {len(targets)} tokens of pydoc topic {args.topic!r}, teacher-forced decode")
    for label, logits in runs.items():
        logp = torch.log_softmax(logits, dim=-1)
        perplexity = torch.exp(-logp.gather(1, targets).mean()).item()
        kl = (reference.exp() * (reference - logp)).sum(-1).mean().item()
        agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
        print(f"{label}: perplexity {perplexity:.3f}, KL from float32 {kl:.5f}, "
              f"top-1 agreement {agree:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
