"""How many torch ops one eager decode step issues, counted on a tiny model of the same kind.

On a GPU every op costs microseconds of Python dispatch and kernel launch whatever its
size, so a 64-layer model that issues ~3,500 ops per token has a floor of tens of
milliseconds per token before any byte is read. The count depends on the architecture
and the depth, not on the width: we build the same config shrunk to a near-zero width
at depth 1 and depth 2, count the aten ops (each a kernel launch on CUDA) that
``generate`` issues per extra token, and extrapolate linearly in the depth. A test
checks the extrapolation against a direct count at a third depth.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import architecture

logger = logging.getLogger(__name__)
# The tiny stand-in: wide enough for every head layout, small enough to count in ~1 s.
TINY_WIDTH = dict(hidden_size=64, intermediate_size=64, num_attention_heads=4, head_dim=16,
                  vocab_size=128)
PROMPT_TOKENS = 3
COUNTED_STEPS = 4  # extra decode steps whose ops are averaged


@dataclass(frozen=True)
class DecodeOps:
    """Ops per decode step: ``base + per_layer x layers`` (generate's loop included)."""

    base: float  # embedding, final norm, lm_head, sampling, stopping checks
    per_layer: float  # one decoder layer
    method: str  # how it was counted, for reports

    def at_depth(self, layers: int) -> int:
        return round(self.base + self.per_layer * layers)


class _OpCounter(TorchDispatchMode):
    """Counts aten ops after dispatch: on CUDA each one is (at most) one kernel launch."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def tiny_config(hf_config, layers: int):
    """The same architecture and options at a near-zero width and the given depth."""
    text = architecture.text_config(hf_config)
    data = text.to_dict()
    kv_ratio = max(1, text.num_attention_heads // (getattr(text, "num_key_value_heads", None)
                                                   or text.num_attention_heads))
    data.update(TINY_WIDTH, num_hidden_layers=layers,
                num_key_value_heads=max(1, TINY_WIDTH["num_attention_heads"] // kv_ratio))
    if isinstance(data.get("layer_types"), list):  # per-layer attention kinds (sliding...)
        data["layer_types"] = (data["layer_types"] * layers)[:layers]
    data.pop("dtype", None)
    data.pop("torch_dtype", None)
    data.pop("quantization_config", None)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # ids of the real vocabulary
        data[key] = None  # (transformers warns about ids past the tiny one; count unchanged)
    tiny = type(text).from_dict(data)
    supported = architecture.supported_attention(tiny)  # as the engine picks without flash-attn
    tiny._attn_implementation = "sdpa" if "sdpa" in supported else "eager"
    return tiny


def count_step_ops(tiny) -> float:
    """Aten ops per decode step of a greedy ``generate`` on a random model built from ``tiny``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny).eval()
    ids = torch.arange(1, PROMPT_TOKENS + 1).unsqueeze(0)  # (1, T)
    counts = []
    for new_tokens in (1, 1 + COUNTED_STEPS):
        with torch.inference_mode(), _OpCounter() as counter:
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           pad_token_id=0, eos_token_id=None)
        counts.append(counter.count)
    return (counts[1] - counts[0]) / COUNTED_STEPS


@functools.lru_cache(maxsize=32)
def _count_for(config_json: str, config_class: type) -> DecodeOps:
    hf_config = config_class.from_dict(json.loads(config_json))
    one = count_step_ops(tiny_config(hf_config, 1))
    two = count_step_ops(tiny_config(hf_config, 2))
    per_layer = two - one
    logger.info("decode ops: %.0f + %.0f per layer (%s)", one - per_layer, per_layer,
                type(hf_config).__name__)
    return DecodeOps(base=one - per_layer, per_layer=per_layer,
                     method="aten ops per greedy generate step, counted on a tiny model of "
                            "this architecture at depths 1 and 2")


def decode_ops(hf_config) -> DecodeOps:
    """Ops per decode step of ``hf_config``'s architecture; counted once per config."""
    text = architecture.text_config(hf_config)
    key = json.dumps(_jsonable(text.to_dict()), sort_keys=True, default=str)
    return _count_for(key, type(text))


def _jsonable(data: dict) -> dict:
    return {key: value for key, value in data.items() if not key.startswith("_")}


def dispatched_ops(run) -> int:
    """Torch ops that ``run()`` sends through the dispatcher from Python or from compiled
    wrapper code: profiler events of aten and custom ops whose parent is not itself an op
    (what an op calls inside is not counted). A compiled step's fused kernels are direct
    calls, not dispatched ops, so this is the per-op overhead that compiling removes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return sum(1 for event in prof.events() if _is_op(event.name)
               and (event.cpu_parent is None or not _is_op(event.cpu_parent.name)))


def _is_op(name: str) -> bool:
    return "::" in name and not name.startswith(("offload.", "##", "Torch-Compiled"))
