"""`plan --speculate-tokens K --acceptance A [--draft-model DIR]`: the speculation part of a plan.

Kept apart from plan_cmd.py: the flags, the draft's size for the memory table, and the
PREDICTION lines. The arithmetic is planning/speculation.py's.
"""

from __future__ import annotations

from typing import List, Optional

from ..errors import ConfigError


def add_args(parser) -> None:
    group = parser.add_argument_group("speculative decoding (a PREDICTION)")
    group.add_argument("--speculate-tokens", type=int, default=None, metavar="K",
                       help="predict decode when every pass verifies K proposed tokens")
    group.add_argument("--acceptance", type=float, default=None, metavar="A",
                       help="share of the K proposal slots accepted, in [0, 1]: from a run "
                            "with --speculate, (tokens per pass - 1) / K")
    group.add_argument("--draft-model", default=None, metavar="DIR",
                       help="a draft model (quantized directory or config.json) kept whole "
                            "on the device: its memory joins the plan, its steps the time")


def draft_bytes(args, request) -> int:
    """Device bytes of --draft-model for the plan's format and dtype (0 without one)."""
    if args.draft_model is None:
        return 0
    from ..planning.speculation import draft_device_bytes

    return draft_device_bytes(args.draft_model, request.resolved_cache_format(),
                              request.torch_dtype())


def predict(args, plan, request) -> Optional[dict]:
    """The speculation PREDICTION as a dict for the report; None without --speculate-tokens."""
    if args.speculate_tokens is None:
        if args.acceptance is not None or args.draft_model is not None:
            raise ConfigError("--acceptance and --draft-model need --speculate-tokens K")
        return None
    if args.acceptance is None:
        raise ConfigError("--speculate-tokens needs --acceptance A: the share of the K "
                          "proposal slots the target accepts, (tokens per pass - 1) / K of a "
                          "run with --speculate")
    if request.batch != 1:
        raise ConfigError("--speculate-tokens predicts one sequence: drop --batch")
    from dataclasses import asdict

    from ..planning.speculation import check_speculation, predict_speculation

    check_speculation("lookup", args.speculate_tokens, 1, None)
    pred = plan.prediction
    return asdict(predict_speculation(
        pred.step_s, pred.streamed_bytes_per_step, args.speculate_tokens, args.acceptance,
        request.profile.device_bandwidth, plan.memory.draft))


def render(spec: Optional[dict], size) -> List[str]:
    if spec is None:
        return []
    draft = (f" + {spec['speculate_tokens']} draft steps of {spec['draft_step_s'] * 1e3:.2f} ms"
             f" ({size(spec['draft_bytes'])} resident)" if spec["draft_bytes"] else "")
    return [
        "",
        f"PREDICTION with speculation (K={spec['speculate_tokens']}, acceptance "
        f"{spec['acceptance']:.0%}; bandwidth model, not a measurement):",
        f"  tokens per pass: 1 + {spec['acceptance']:.2f} x {spec['speculate_tokens']} = "
        f"{spec['tokens_per_pass']:.2f}; streamed per token: "
        f"{size(spec['streamed_bytes_per_token'])}",
        f"  per pass: target step {spec['target_pass_s'] * 1e3:.2f} ms{draft} = "
        f"{spec['pass_s'] * 1e3:.2f} ms",
        f"  predicted decode: {spec['tokens_per_s']:.3g} tokens/s "
        f"({spec['speedup']:.2f}x without speculation)",
    ]
