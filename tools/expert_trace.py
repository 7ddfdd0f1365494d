"""Hit rates of the expert cache policies on a routing trace recorded over real text.

  python tools/expert_trace.py                 a tiny random Qwen3-MoE (built and quantized here)
  python tools/expert_trace.py --model DIR     any quantized mixture-of-experts directory
  python tools/expert_trace.py --tokens 256 --json trace.json

The text is CPython's pydoc topics (``pydoc_data.topics``, shipped with Python). One
forward over --tokens tokens records, per token and experts layer, the experts its router
picked; ``planning.expert_policy.replay`` then replays decode (one token at a time) for
lfu and lru at every slot count per layer, the same victim choice the runtime makes, and
the share of uses a fixed resident set serves (``--placement experts-cpu``'s
lowest-numbered experts, and the trace's own most used ones: a bound no choice made
before seeing the text reaches). It prints a Markdown table, then how often the
next-layer prefetch's guesses (the next layer's router applied to this layer's input,
per token) named experts that the next layer then picked. A random model's routing is
not a trained model's: the numbers say how the policies compare on this trace, not what
a real MoE gets.
"""

from __future__ import annotations

import argparse
import json
import pydoc_data.topics
import tempfile
from pathlib import Path

import torch

from offload_engine.checkpoint.convert import convert
from offload_engine.checkpoint.synth_tokenizer import train_tokenizer
from offload_engine.decode.api import load
from offload_engine.planning.expert_policy import (
    EXPERT_POLICIES,
    most_used,
    replay,
    static_hits,
)
from offload_engine.quality.routing import guess_accuracy, record_routing
from offload_engine.quant.layout import QuantSpec


def tiny_qwen3_moe(directory: Path, seed: int) -> Path:
    """The tests' tiny Qwen3-MoE: 2 layers, hidden 64, 4 experts, top-2, random weights."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                            max_position_embeddings=1024, initializer_range=0.3,
                            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                            head_dim=16, bos_token_id=1, eos_token_id=0, pad_token_id=0,
                            tie_word_embeddings=False)
    torch.manual_seed(seed)
    source = directory / "src"
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(source)
    train_tokenizer(source, 512)
    convert(source, directory / "q", QuantSpec("int4", 32), progress=False)
    return directory / "q"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="a quantized MoE directory")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--topic", default="class", help="pydoc topic whose text is fed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the trace here")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="compute dtype the routing is recorded in (default float32, "
                             "as docs/moe.md's figures)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_qwen3_moe(Path(tmp), args.seed)
        with load(model, progress=False, dtype=args.dtype) as engine:
            text = pydoc_data.topics.topics[args.topic]
            ids = engine.tokenizer(text, return_tensors="pt")["input_ids"][:, :args.tokens]
            trace = record_routing(engine.model, ids)
            used, guessed = guess_accuracy(engine.model, ids)
            experts = engine.stats["experts_per_layer"]
    if args.json:
        args.json.write_text(json.dumps(trace))
    print(f"{len(trace)} tokens of pydoc topic {args.topic!r}, {len(trace[0])} experts layers, "
          f"{experts} experts, top-{len(trace[0][0])}; expert hit rate in decode order:\n")
    fixed = ("fixed: lowest-numbered (experts-cpu)", "fixed: most used on this trace")
    print("| slots per layer | " + " | ".join(EXPERT_POLICIES + fixed) + " |")
    print("|---|" + "---|" * (len(EXPERT_POLICIES) + len(fixed)))
    for slots in range(1, experts + 1):
        rates = []
        for policy in EXPERT_POLICIES:
            hits, misses = replay(trace, slots, policy)
            rates.append(f"{hits / (hits + misses):.1%}")
        layers = len(trace[0])
        for resident in ([set(range(slots))] * layers, most_used(trace, slots)):
            hits, uses = static_hits(trace, resident)
            rates.append(f"{hits / uses:.1%}")
        print(f"| {slots} | " + " | ".join(rates) + " |")
    print(f"\nnext-layer prefetch guesses (--expert-prefetch on): {used} of {guessed} guessed "
          f"experts were then picked ({used / guessed:.1%}); a random guess of "
          f"top-{len(trace[0][0])} of {experts} would get {len(trace[0][0]) / experts:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
