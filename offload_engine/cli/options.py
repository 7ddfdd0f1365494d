"""The shared engine flags: one function adds them, one builds the EngineConfig.

The CLI subcommands, the server and the scripts in tools/ all reuse these two.
"""

from __future__ import annotations

import argparse
import sys

from ..planning.kv_sizes import KV_CACHE_MODES
from ..planning.speculation import SPECULATE_MODES
from ..planning.words import (
    CACHE_FORMATS,
    DTYPE_NAMES,
    EXPERT_POLICIES,
    ON_OFF,
    PLACEMENTS,
    POLICIES,
)


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
    group.add_argument("--expert-prefetch", choices=ON_OFF, default="on",
                       help="mixture-of-experts models: while a layer computes, copy the "
                            "experts the next layer's router would pick for this layer's "
                            "input (on, default), or fetch routed experts on demand only")
    group.add_argument("--prefetch-depth", type=int, default=2, metavar="K",
                       help="streamed weights copied ahead of the one computing (default 2)")
    group.add_argument("--cache-format", choices=("auto",) + CACHE_FORMATS, default="auto",
                       help="hold cached weights packed (INT4, for the fused kernel), "
                            "dequantized, or prepacked (CPU: packed plus the CPU int4 "
                            "kernel's form); auto: packed on CUDA; on CPU prepacked with "
                            "--dtype bfloat16 and an int4 scheme, else dequantized")
    group.add_argument("--dtype", choices=("auto",) + DTYPE_NAMES, default="auto",
                       help="compute dtype; auto: bfloat16 on CUDA, and on CPU for int4 schemes "
                            "(the CPU int4 kernel), else float32")
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
    group.add_argument("--placement", choices=PLACEMENTS, default="auto",
                       help="where decoder layer parts run: stream (every weight through the "
                            "device cache), cpu (every attention and MLP computed on the CPU "
                            "from host RAM), mlp-cpu (MLPs on the CPU), experts-cpu "
                            "(mixture-of-experts models: the experts not in the device's "
                            "expert slots computed on the CPU, llama.cpp's --n-cpu-moe), "
                            "auto (with "
                            "--hw-profile on CUDA the faster prediction of `plan`; else "
                            "stream)")
    add_kv_cache_arg(group)
    group.add_argument("--kv-budget", default=None, metavar="B",
                       help="device bytes the KV cache may take (e.g. 2GiB); a longer context "
                            "is refused with the numbers (default: no cap)")
    group.add_argument("--compile", action="store_true",
                       help="run each decode step through torch.compile with a static-shape "
                            "KV cache (CUDA graphs on CUDA when nothing streams); the first "
                            "step compiles (minutes on a small CPU), later ones reuse it; "
                            "serve decodes --max-batch fixed slots (docs/serving.md); not with "
                            "--speculate (docs/performance.md)")
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


def add_sampling_args(group) -> None:
    """How tokens are chosen (llama.cpp's names, with transformers' as aliases). A flag left
    out takes the model's generation_config.json value; a model that does not ask for
    sampling decodes greedily, as transformers does."""
    group.add_argument("--temp", "--temperature", dest="temperature", type=float, default=None,
                       metavar="T", help="sampling temperature; 0 is greedy (default: the "
                                         "model's generation_config.json)")
    group.add_argument("--top-p", type=float, default=None, metavar="P",
                       help="nucleus sampling: keep the likeliest tokens covering P")
    group.add_argument("--top-k", type=int, default=None, metavar="K",
                       help="keep the K likeliest tokens (0: all)")
    group.add_argument("--min-p", type=float, default=None, metavar="P",
                       help="drop tokens less likely than P x the likeliest one")
    group.add_argument("--repeat-penalty", "--repetition-penalty", dest="repetition_penalty",
                       type=float, default=None, metavar="R",
                       help="divide the logits of tokens already in the prompt or reply by R "
                            "(1: off; 1.1 is common)")
    group.add_argument("--presence-penalty", type=float, default=None, metavar="X",
                       help="OpenAI's: subtract X from tokens the reply already holds")
    group.add_argument("--frequency-penalty", type=float, default=None, metavar="X",
                       help="OpenAI's: subtract X per time the reply holds a token")
    group.add_argument("--greedy", action="store_true", help="always take the likeliest token")
    group.add_argument("--seed", type=int, default=None, help="seed for sampling")
    group.add_argument("--stop", action="append", default=None, metavar="TEXT",
                       help="end the reply before TEXT (repeat the flag for several)")


SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                  "presence_penalty", "frequency_penalty", "greedy", "seed", "stop")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of ``engine.generate`` the sampling flags describe."""
    return {name: getattr(args, name) for name in SAMPLING_FLAGS}


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
        expert_prefetch=args.expert_prefetch,
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
        compile=args.compile,
        placement=args.placement,
    )


MODEL_HELP = ("a directory written by `quantize`, a .gguf file, a Hugging Face checkpoint "
              "directory, id (ORG/NAME, from the local HF cache) or cache folder "
              "(models--ORG--NAME); anything but the first is converted once into the "
              "engine's cache and reused")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """MODEL, positionally or as llama.cpp's -m, and how a source given as MODEL is
    converted on first use; also -ngl, which gets a pointer to --gpu-budget."""
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("-m", "--model", dest="model_flag", default=None, metavar="MODEL",
                        help="MODEL as a flag (llama.cpp's spelling)")
    parser.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", dest="n_gpu_layers",
                        default=None, metavar="N",
                        help="not used: weights are budgeted in bytes (--gpu-budget), not "
                             "layers")
    from .method_options import add_method_args

    add_method_args(parser, calibration_device=False)
    parser.add_argument("--reconvert", action="store_true",
                        help="a GGUF or HF checkpoint MODEL: convert again even if cached")


def check_llama_cpp_flags(args: argparse.Namespace) -> None:
    from ..errors import ConfigError

    if getattr(args, "n_gpu_layers", None) is not None:
        raise ConfigError(
            f"-ngl {args.n_gpu_layers}: offload-engine does not place whole layers; it keeps "
            "as many weights on the GPU as --gpu-budget allows (e.g. --gpu-budget 6GiB, or "
            "0.8 of free memory; default: all that fit) and streams the rest")


def model_argument(args: argparse.Namespace):
    """MODEL from -m or the positional slot (exactly one), before any conversion."""
    from ..errors import ConfigError

    check_llama_cpp_flags(args)
    if (args.model_flag is not None and args.model is not None
            and getattr(args, "prompt_text", False) is None):
        args.prompt_text, args.model = args.model, None  # run -m MODEL "prompt"
    if args.model_flag is not None and args.model is not None:
        raise ConfigError(f"give the model once: -m {args.model_flag} or {args.model}, "
                          "not both")
    model = args.model_flag if args.model_flag is not None else args.model
    if model is None:
        raise ConfigError("no model: pass a quantized directory, a .gguf file or a Hugging "
                          "Face checkpoint (positionally or with -m)")
    return model


def model_from_args(args: argparse.Namespace):
    """The quantized directory for MODEL, converting a GGUF or HF checkpoint on first use
    (notes on stderr); calibration, if the method calibrates, runs on --device."""
    from ..checkpoint.autoconvert import ConversionSettings, ensure_converted
    from .method_options import method_from_args

    model = model_argument(args)  # a missing model is refused before torch is imported
    settings = ConversionSettings(method=method_from_args(args, args.device),
                                  reconvert=args.reconvert)
    return ensure_converted(model, settings, progress=not args.no_progress, notify=note)


def note(line: str) -> None:
    """One-line notes for the user (conversions, chosen methods) go to stderr."""
    print(f"note: {line}", file=sys.stderr, flush=True)


def add_prompt_args(parser: argparse.ArgumentParser) -> None:
    """`run`'s prompt: positional, -p, -f FILE (llama.cpp's flags) or stdin; chat or raw."""
    parser.add_argument("prompt_text", nargs="?", default=None, metavar="PROMPT",
                        help="the prompt text (or -p TEXT, -f FILE, or piped on stdin)")
    parser.add_argument("-p", "--prompt", default=None, help="the prompt text")
    parser.add_argument("-f", "--file", dest="prompt_file", default=None, metavar="FILE",
                        help="read the prompt from FILE")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="wrap the prompt in the model's chat template (the default when "
                           "the model has one)")
    mode.add_argument("--raw", "--no-chat", dest="chat", action="store_false",
                      help="continue the prompt as plain text, without the chat template")


def prompt_from_args(args: argparse.Namespace) -> str:
    """The prompt: positional, -p, -f FILE, or stdin when none is given and stdin is not a
    terminal; exactly one, and not blank. Call model_argument first (``-m MODEL "prompt"``
    moves the prompt into place)."""
    from ..errors import ConfigError

    given = {name: value for name, value in (("positionally", args.prompt_text),
                                             ("-p", args.prompt), ("-f", args.prompt_file))
             if value is not None}
    if len(given) > 1:
        raise ConfigError(f"give the prompt once, not {' and '.join(given)}")
    if args.prompt_file is not None:
        try:
            prompt = open(args.prompt_file, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"-f {args.prompt_file}: cannot read the prompt ({exc})") from exc
    elif given:
        prompt = next(iter(given.values()))
    else:
        prompt = _piped_stdin()
    if prompt is None:
        raise ConfigError("no prompt: offload-engine run MODEL \"your prompt\" (or -p TEXT, "
                          "-f FILE, or pipe it in)")
    if not prompt.strip():
        raise ConfigError("the prompt is empty; give some text")
    problem = not_utf8(prompt)
    if problem:
        raise ConfigError(f"the prompt is not valid UTF-8 text ({problem}); give text, not "
                          "binary data")
    return prompt


def not_utf8(text: str) -> str:
    """Why ``text`` (from argv or stdin, undecodable bytes kept as surrogates) is not
    UTF-8 text, or "" when it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"byte {ord(text[exc.start]) & 0xFF:#04x} at character {exc.start}"
    return ""


def _piped_stdin():
    """The text piped into stdin, or None when stdin is a terminal or cannot be read."""
    stream = sys.stdin
    try:
        if stream is None or stream.isatty():
            return None
        return stream.read()
    except (OSError, ValueError):  # closed, or a test runner's stand-in
        return None
