"""Measure speculative decoding on a fixed prompt set: tokens per pass, acceptance, tok/s.

  OMP_WAIT_POLICY=PASSIVE python tools/speculation_table.py            the embedded SmolLM2
  python tools/speculation_table.py --lookup-tokens 2,4,8 --draft-tokens 2,4 --tokens 48

The target is the embedded SmolLM2 converted to int8 g128; the draft is the same model
converted to int4-asym g64 (a lower-precision copy with the same tokenizer, standing in
for a small model of the same family). Every proposer runs on three kinds of prompt (code
editing, summarising a given text, open-ended chat), greedy, at each --budgets value of the
target's weight budget (the draft's bytes are added on top, as --draft-model requires).
Every run is checked to give the same tokens as plain decoding. It prints a Markdown
table and writes --json. On a CPU every timing is a CPU timing.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from offload_engine.checkpoint.embedded import ensure_demo_model
from offload_engine.decode.api import load
from offload_engine.quant.layout import QuantSpec
from offload_engine.runtime.engine import device_name
from offload_engine.units import format_bytes

TEXT = ("The Moon does not make its own light. Half of it is always lit by the Sun, and as it "
        "orbits the Earth about once a month we see different parts of that lit half. When "
        "the Moon is between the Earth and the Sun we see its dark side: a new moon. A week "
        "later we see half of the lit side, then all of it at full moon, then half again.")
CODE = ("def squares(numbers):\n    result = []\n    for n in numbers:\n        if n % 2 == 0:\n"
        "            result.append(n * n)\n    return result\n")
PROMPTS = {
    "code edit": f"Rewrite this Python function to use a list comprehension:\n\n{CODE}",
    "summarise": f"{TEXT}\n\nSummarise the text above in two sentences.",
    "chat": "What are some good habits for staying focused while working from home?",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per run (default 48)")
    parser.add_argument("--lookup-tokens", default="2,4,8", help="K values for lookup")
    parser.add_argument("--lookup-ngram", type=int, default=2, help="n-gram size for lookup")
    parser.add_argument("--draft-tokens", default="4", help="K values for the draft model")
    parser.add_argument("--budgets", default="min,unbounded",
                        help="target weight budgets: min (almost every weight streams), "
                             "unbounded (all resident), or a size such as 64MiB")
    parser.add_argument("--json", type=Path, default=Path("speculation.json"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--server", action="store_true",
                        help="also decode each prompt alone through the server's scheduler, "
                             "with and without --speculate lookup (K = first --lookup-tokens)")
    return parser.parse_args(argv)


def proposers(args) -> list:
    """[(label, speculate, K)] in table order: plain decoding first, the reference."""
    rows = [("off", "off", 1)]
    rows += [(f"lookup K={k}", "lookup", k) for k in _ints(args.lookup_tokens)]
    rows += [(f"draft K={k}", "draft", k) for k in _ints(args.draft_tokens)]
    return rows


def _ints(text: str) -> list:
    return [int(part) for part in text.split(",") if part.strip()]


def run_one(engine, prompt: str, speculate: str, k: int, tokens: int):
    return engine.generate(prompt, chat=True, greedy=True, max_new_tokens=tokens,
                           speculate=speculate, speculate_tokens=k)


def measure(target: Path, draft: Path, budget_label: str, args) -> list:
    """Every proposer on every prompt at one budget; rows as dicts."""
    minimum, draft_bytes = probe(target, draft)
    budget = {"min": minimum, "unbounded": None}.get(budget_label, budget_label)
    total = None if budget is None else _bytes(budget) + draft_bytes
    rows, reference = [], {}
    with load(target, draft_model=str(draft), gpu_budget=total, progress=False) as engine:
        run_one(engine, "Hello", "off", 1, 4)  # warm-up: first-call costs are not decode
        for kind, prompt in PROMPTS.items():  # proposers side by side in time: fairer timings
            for label, speculate, k in proposers(args):
                result = run_one(engine, prompt, speculate, k, args.tokens)
                reference.setdefault(kind, result.token_ids)
                rows.append(row(budget_label, label, kind, result, reference[kind]))
                print(_markdown_row(rows[-1]), flush=True)
    return rows


def probe(target: Path, draft: Path):
    """(target's minimum weight budget, draft's device bytes)."""
    with load(target, draft_model=str(draft), progress=False) as engine:
        return engine.plan.minimum_budget, engine.draft_bytes


def _bytes(value) -> int:
    from offload_engine.units import parse_bytes

    return value if isinstance(value, int) else parse_bytes(value)


def row(budget: str, label: str, kind: str, result, reference: list) -> dict:
    stats = result.stats
    return dict(budget=budget, proposer=label, prompt=kind, tokens=stats.new_tokens,
                passes=stats.forward_passes, tokens_per_pass=stats.tokens_per_pass,
                acceptance=stats.acceptance_rate if label != "off" else None,
                h2d_per_token=stats.h2d_bytes_per_generated_token,
                tok_s=stats.decode_tokens_per_s, draft_passes=stats.draft_forward_passes,
                identical=result.token_ids == reference)


HEADER = ("| budget | proposer | prompt | tokens | passes | tokens/pass | acceptance | "
          "host->device per token | tok/s | same tokens as off |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def _markdown_row(r: dict) -> str:
    acceptance = "-" if r["acceptance"] is None else f"{r['acceptance']:.0%}"
    return (f"| {r['budget']} | {r['proposer']} | {r['prompt']} | {r['tokens']} | "
            f"{r['passes']} | {r['tokens_per_pass']:.2f} | {acceptance} | "
            f"{format_bytes(r['h2d_per_token'])} | {r['tok_s']:.2f} | "
            f"{'yes' if r['identical'] else 'NO'} |")


def summary(rows: list) -> list:
    """One line per (budget, proposer): totals over the prompts."""
    lines = []
    keys = dict.fromkeys((r["budget"], r["proposer"]) for r in rows)
    for budget, proposer in keys:
        group = [r for r in rows if r["budget"] == budget and r["proposer"] == proposer]
        tokens, passes = sum(r["tokens"] for r in group), sum(r["passes"] for r in group)
        seconds = sum((r["tokens"] - 1) / r["tok_s"] for r in group if r["tok_s"])
        h2d = sum(r["h2d_per_token"] * r["tokens"] for r in group)
        lines.append(f"| {budget} | {proposer} | all three | {tokens} | {passes} | "
                     f"{tokens / passes:.2f} | | {format_bytes(h2d / tokens)} | "
                     f"{(tokens - len(group)) / seconds:.2f} | "
                     f"{'yes' if all(r['identical'] for r in group) else 'NO'} |")
    return lines


def server_rows(target: Path, k: int, args) -> list:
    """The server's lone-sequence speculation (server/speculative_step.py), greedy."""
    from offload_engine.server.batcher import Scheduler, Sequence
    from offload_engine.server.sampling import SamplingParams

    print(f"\nServer scheduler, one request at a time, target budget min, lookup K={k}:")
    print("| proposer | prompt | tokens | passes | tokens/pass | same tokens as off |\n"
          "|---|---|---|---|---|---|")
    rows, reference = [], {}
    for mode in ("off", "lookup"):
        with load(target, progress=False, speculate=mode, speculate_tokens=k,
                  gpu_budget=probe_minimum(target)) as engine:
            for kind, prompt in PROMPTS.items():
                ids = engine.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], add_generation_prompt=True,
                    return_dict=True)["input_ids"]
                sequence = Sequence(ids, SamplingParams(args.tokens, temperature=0), print_nothing)
                scheduler, before = Scheduler(engine), engine.cache.stats.passes
                scheduler.submit(sequence)
                while scheduler._waiting or scheduler._active:
                    scheduler.step()
                passes = engine.cache.stats.passes - before
                reference.setdefault(kind, sequence.token_ids)
                rows.append(dict(budget="server", proposer=mode, prompt=kind, passes=passes,
                                 tokens=len(sequence.token_ids),
                                 identical=sequence.token_ids == reference[kind]))
                print(f"| {mode} | {kind} | {len(sequence.token_ids)} | {passes} | "
                      f"{len(sequence.token_ids) / passes:.2f} | "
                      f"{'yes' if rows[-1]['identical'] else 'NO'} |", flush=True)
    return rows


def print_nothing(_event) -> None:
    """The scheduler's events are not needed here: the tokens are on the Sequence."""


def probe_minimum(target: Path) -> int:
    with load(target, progress=False) as engine:
        return engine.plan.minimum_budget


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    target, _ = ensure_demo_model(QuantSpec("int8", 128))
    draft, _ = ensure_demo_model(QuantSpec("int4-asym", 64))
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    print(f"target {target.name}, draft {draft.name}, {args.tokens} greedy tokens, "
          f"{device_name(device)} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__})")
    print(HEADER)
    rows = []
    for budget in args.budgets.split(","):
        rows += measure(target, draft, budget.strip(), args)
    print("\nTotals over the three prompts (tok/s: decode tokens / decode seconds):")
    print(HEADER)
    print("\n".join(summary(rows)))
    if args.server:
        rows += server_rows(target, _ints(args.lookup_tokens)[0], args)
    args.json.write_text(json.dumps(rows, indent=1))
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
