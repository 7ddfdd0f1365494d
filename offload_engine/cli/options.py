"""The shared engine flags: one function adds them, one builds the EngineConfig.

The CLI subcommands, the server and the scripts in tools/ all reuse these two.
"""

from __future__ import annotations

import argparse

from ..planning.kv_sizes import KV_CACHE_MODES
from ..planning.speculation import SPECULATE_MODES
from ..planning.words import CACHE_FORMATS, DTYPE_NAMES, EXPERT_POLICIES, POLICIES


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--device", default="auto",
                       help="cuda:0, cuda:1, cpu; auto picks cuda:0 when a GPU is visible")
    budget = group.add_mutually_exclusive_group()
    budget.add_argument("--gpu-budget", default=None, metavar="B",
                        help="device bytes for cached weights: 10GiB, 8GB, a share of free "
                             "memory such as 0.8, or 'unbounded' (default)")
    budget.add_argument("--cache-entries", type=int, default=None, metavar="N",
                        help="budget as N slots of the largest weight (the classic recipe's knob)")
    group.add_argument("--policy", choices=POLICIES, default="static",
                       help="static: fixed resident set + streaming ring (default, best for "
                            "decoding); lru: classic eviction, for comparison")
    group.add_argument("--expert-policy", choices=EXPERT_POLICIES, default="lfu",
                       help="mixture-of-experts models: which expert leaves a layer's full "
                            "expert cache; lfu: the least used so far (default), lru: the "
                            "least recently used")
    group.add_argument("--prefetch-depth", type=int, default=2, metavar="K",
                       help="streamed weights copied ahead of the one computing (default 2)")
    group.add_argument("--cache-format", choices=("auto",) + CACHE_FORMATS, default="auto",
                       help="hold cached weights packed (INT4, for the fused kernel) or "
                            "dequantized; auto: packed on CUDA, dequantized on CPU")
    group.add_argument("--dtype", choices=("auto",) + DTYPE_NAMES, default="auto",
                       help="compute dtype; auto: bfloat16 on CUDA, float32 on CPU")
    group.add_argument("--attention", default="auto",
                       choices=("auto", "flash_attention_2", "sdpa", "eager"),
                       help="attention kernel; auto: flash_attention_2 when installed on CUDA")
    group.add_argument("--embeddings", choices=("device", "host"), default="device",
                       help="host keeps the token embedding table in host RAM and gathers rows "
                            "there (frees vocab x hidden x 2 bytes of GPU memory; untied "
                            "models only)")
    group.add_argument("--hw-profile", default=None, metavar="NAME|PATH",
                       help="without --gpu-budget, use the weight budget `offload-engine plan` "
                            "derives for this card (e.g. rtx4060-8gb to try an 8 GB setup on a "
                            "bigger GPU)")
    group.add_argument("--host-budget", default=None, metavar="B",
                       help="host RAM for weights (4GiB, or 'unbounded'); the rest is read "
                            "from the shard files every token. Default: what fits in "
                            "available RAM with a margin")
    add_kv_cache_arg(group)
    group.add_argument("--kv-budget", default=None, metavar="B",
                       help="device bytes the KV cache may take (e.g. 2GiB); a longer context "
                            "is refused with the numbers (default: no cap)")
    group.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_speculation_args(parser)


def add_speculation_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("speculative decoding (more tokens per weight pass)")
    group.add_argument("--speculate", choices=SPECULATE_MODES, default="off",
                       help="lookup: propose tokens from n-grams already in the context; "
                            "draft: from --draft-model; the target verifies them in one pass "
                            "(greedy output unchanged; default off)")
    group.add_argument("--speculate-tokens", type=int, default=4, metavar="K",
                       help="proposals verified per forward pass (default 4)")
    group.add_argument("--lookup-ngram", type=int, default=2, metavar="N",
                       help="longest n-gram --speculate lookup matches (default 2)")
    group.add_argument("--draft-model", default=None, metavar="DIR",
                       help="a quantized small model with the same tokenizer, kept whole on "
                            "the device; its bytes count in --gpu-budget")


def add_kv_cache_arg(group) -> None:
    """--kv-cache, shared with `plan` (which does not take the other engine flags)."""
    group.add_argument("--kv-cache", choices=KV_CACHE_MODES, default="bf16",
                       help="KV cache storage: bf16 = the compute dtype, unquantized (float32 "
                            "on CPU; default); int8, int4, or k8v4 (keys int8, values int4) = "
                            "per token and head, float16 scale and minimum per 32 elements "
                            "of the head dim (docs/quality.md)")


def engine_config_from_args(args: argparse.Namespace):
    """The EngineConfig the flags describe (imported here: torch stays out of --help)."""
    from ..runtime.config import EngineConfig

    return EngineConfig(
        device=args.device,
        gpu_budget=args.gpu_budget,
        cache_entries=args.cache_entries,
        policy=args.policy,
        prefetch_depth=args.prefetch_depth,
        expert_policy=args.expert_policy,
        cache_format=args.cache_format,
        dtype=args.dtype,
        attention=args.attention,
        hw_profile=args.hw_profile,
        embeddings=args.embeddings,
        progress=not args.no_progress,
        host_budget=args.host_budget,
        speculate=args.speculate,
        speculate_tokens=args.speculate_tokens,
        lookup_ngram=args.lookup_ngram,
        draft_model=args.draft_model,
        kv_cache=args.kv_cache,
        kv_budget=args.kv_budget,
    )
