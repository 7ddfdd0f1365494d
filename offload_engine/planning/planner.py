"""Will a model fit on a card, and how fast will it decode? Sizing and a bandwidth model.

Pure arithmetic on shapes: the planner reads a quantized directory's manifest and
config.json, or a bare Hugging Face config.json (plan before downloading 65 GB), builds
the empty skeleton to learn every linear's shape, sizes the weights with
:meth:`QuantSpec.nbytes` / :func:`held_nbytes`, and asks :func:`plan_cache` (the one
cache policy, shared with the runtime) which weights stay resident. Embeddings, KV
cache, activations and the reserve are sized here.

The speed is a PREDICTION from a memory-bound model of one decode step: each step
reads every resident weight from device memory, copies every streamed weight over
the host link, and reads each sequence's KV cache. One step serves the whole batch.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional, Tuple, Union

import torch

from ..errors import ConfigError
from ..model.model_shape import LinearShape, ModelShape
from ..quant.layout import QuantSpec
from ..quant.quantize import QuantizedWeight
from ..units import parse_budget
from .describe import describe_model
from .disk_plan import add_disk_tier
from .expert_policy import ExpertPlan, plan_with_experts
from .kv_sizes import check_kv_mode, kv_layout_for
from .moe_sizes import ExpertSizes, expert_hit_rate, expert_sizes, expert_traffic, meta_weight
from .overhead import decode_overhead, weight_read_bandwidth
from .placement import Placement, check_placement
from .placement_plan import add_placement
from .policy import POLICIES, CachePlan, plan_cache
from .profiles import HardwareProfile
from .settings import DTYPES, EMBEDDING_PLACES, UNBOUNDED
from .sizes import CACHE_FORMATS, auto_cache_format, auto_dtype, held_nbytes

logger = logging.getLogger(__name__)
__all__ = ["Plan", "PlanRequest", "describe_model", "make_plan", "predict"]
LOGITS_BYTES = 4  # logits are upcast to float32 before sampling
PREFILL_SCRATCH_MAX_ELEMENTS = 1 << 26  # kernels/triton_dequant.py DEFAULT_MAX_SCRATCH_ELEMENTS


@dataclass
class PlanRequest:
    """The question asked: which card, which settings. Fields mirror the CLI flags."""

    profile: HardwareProfile  # the card (or cpu)
    gpu_budget: Optional[Union[str, int, float]] = None  # None: what the card leaves free
    cache_entries: Optional[int] = None  # the classic N-entry knob instead of a budget
    context: int = 4096  # tokens per sequence: sizes the KV cache and the prefill
    batch: int = 1  # sequences decoded together
    policy: str = "static"  # cache policy, as in the runtime
    prefetch_depth: int = 2  # staging slots beyond the one computing
    cache_format: str = "auto"  # packed, dequantized, prepacked; auto: as sizes.auto_cache_format
    dtype: str = "auto"  # compute dtype; auto: as sizes.auto_dtype (bfloat16 on cuda)
    embeddings: str = "device"  # "host": the token embedding table stays in host RAM
    host_budget: Optional[Union[str, int]] = None  # host RAM for weights; None: unbounded
    draft_bytes: int = 0  # a --draft-model kept whole on the device (planning/speculation.py)
    kv_cache: str = "bf16"  # KV cache storage: bf16 (the compute dtype), int8, int4
    placement: str = "auto"  # where layer parts run (placement.py): auto, stream, cpu, mlp-cpu
    # mixture-of-experts models: the expert cache hit rate to predict with (None: slots /
    # experts, uniform routing) and the expert cache policy, as in the runtime
    expert_hit_rate: Optional[float] = None
    expert_policy: str = "lfu"

    def __post_init__(self) -> None:
        check_kv_mode(self.kv_cache)
        check_placement(self.placement)
        if self.context < 1 or self.batch < 1:
            raise ConfigError(f"--context and --batch must be at least 1, got {self.context} "
                              f"and {self.batch}")
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown --policy {self.policy!r}: use {' or '.join(POLICIES)}")
        if self.cache_format not in CACHE_FORMATS + ("auto",):
            raise ConfigError(f"unknown --cache-format {self.cache_format!r}")
        if self.dtype not in tuple(DTYPES) + ("auto",):
            raise ConfigError(f"unknown --dtype {self.dtype!r}: use auto, {', '.join(DTYPES)}")
        if self.gpu_budget is not None and self.cache_entries is not None:
            raise ConfigError("give either --gpu-budget or --cache-entries, not both")
        if self.embeddings not in EMBEDDING_PLACES:
            raise ConfigError(f"unknown --embeddings {self.embeddings!r}: use device or host")

    # Same defaults as EngineConfig, decided by the profile's device instead of this machine's.
    def torch_dtype(self, spec=None) -> torch.dtype:
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        return auto_dtype(self.profile.device, spec)

    def resolved_cache_format(self, spec=None) -> str:
        if self.cache_format != "auto":
            return self.cache_format
        return auto_cache_format(self.profile.device, self.torch_dtype(spec), spec)

    def explicit_budget(self) -> Tuple[bool, Optional[int]]:
        """(given, bytes): bytes None means unbounded; a fraction is of usable memory."""
        if self.gpu_budget is None:
            return False, None
        text = str(self.gpu_budget).strip().lower()
        if text in UNBOUNDED:
            return True, None
        if re.fullmatch(r"0?\.\d+|1(\.0*)?", text):
            return True, int(float(text) * self.profile.usable_bytes)
        try:
            return True, parse_budget(self.gpu_budget)
        except Exception as exc:  # argparse.ArgumentTypeError: not a ValueError
            raise ConfigError(f"--gpu-budget: {exc}") from exc


@dataclass
class Memory:
    """Device memory, in bytes, by what holds it."""

    resident_weights: int  # weights kept on the device for the whole run (held form)
    staging_ring: int  # slots that streamed weights pass through
    embeddings: int  # the token embedding on the device (0 with --embeddings host)
    other_dense: int  # norms, biases
    kv_cache: int  # at --context x --batch (int8/int4: plus one layer dequantized)
    kv_cache_per_token: int  # one token of one sequence, all layers, K and V, as stored
    activations: int  # estimate: prefill of a whole --context, logits, kernel scratch
    reserve: int  # the profile's CUDA context / workspace allowance
    host_store: int  # INT4 weights in host RAM: counted here only when the device is cpu
    draft: int = 0  # a speculative-decoding draft model, every weight resident
    expert_slots: int = 0  # mixture-of-experts: the expert slots of every experts layer

    @property
    def total(self) -> int:
        return (self.resident_weights + self.staging_ring + self.expert_slots + self.fixed
                + self.reserve)

    @property
    def fixed(self) -> int:
        """Everything that is not the weight arena and not the reserve."""
        return (self.embeddings + self.other_dense + self.kv_cache + self.activations
                + self.host_store + self.draft)


@dataclass
class Prediction:
    """PREDICTION of one decode step from the bandwidth model (not a measurement)."""

    resident_read_s: float  # resident bytes / device bandwidth
    dense_read_s: float  # norms, and a tied lm_head's dense embedding matrix / device bandwidth
    stream_s: float  # streamed bytes / host-to-device bandwidth
    kv_read_s: float  # batch x KV cache at --context / device bandwidth
    step_s: float  # the sum: one step decodes one token for every sequence
    tokens_per_s: float  # batch / step_s, all sequences together
    tokens_per_s_per_sequence: float  # 1 / step_s
    streamed_bytes_per_step: int  # host->device per step, shared by the batch
    streamed_bytes_per_token: float  # the above over the batch
    hit_rate: float  # cache hits per weight use
    disk_read_s: float = 0.0  # bytes read from disk / disk bandwidth (overlaps the stream)
    disk_bytes_per_step: int = 0  # weights read from the shards per step (--host-budget)
    overhead_s: float = 0.0  # ops per step x the profile's seconds per op (planning/overhead.py)
    ops_per_step: Optional[int] = None  # aten ops of one eager decode step; None: not counted
    # mixture-of-experts models (planning/moe_sizes.py): included in the step above
    expert_hit_rate: Optional[float] = None  # given, or the uniform-routing estimate
    experts_per_step: int = 0  # experts the routers pick per step, over all layers
    expert_stream_bytes_per_step: int = 0  # of streamed_bytes_per_step
    expert_read_s: float = 0.0  # the picked experts on the device / device bandwidth


@dataclass
class Plan:
    """The answer: sizes, the cache split, the prediction and whether it fits."""

    model: Dict[str, object]  # source, type, scheme, shape numbers
    hardware: Dict[str, object]  # the profile's numbers
    settings: Dict[str, object]  # policy, depth, cache format, dtype, context, batch, budget
    weights: Dict[str, int]  # linear_layers, lm_head, total copy/held bytes
    memory: Memory
    cache: CachePlan  # exactly what the runtime would build with this budget
    experts: Optional[ExpertPlan]  # the expert slots the runtime would build (MoE only)
    minimum_budget: int  # smallest arena the policy accepts
    minimum_memory: int  # smallest card: minimum arena + everything else + reserve
    all_resident_memory: int  # the card that would hold every weight
    prediction: Prediction
    fits: bool  # everything, reserve included, within the card's memory
    weight_names: List[str] = field(default_factory=list)  # execution order (not in JSON)
    host: Dict[str, object] = field(default_factory=dict)  # host RAM / disk split (disk_plan)
    placement: Dict[str, object] = field(default_factory=dict)  # placement.Placement.summary()
    placement_plan: Optional[Placement] = None  # the decision itself (not in JSON)

    def as_dict(self) -> dict:
        data = asdict(self)
        data.pop("weight_names")
        data.pop("placement_plan")
        data["memory"]["total"] = self.memory.total
        data["cache"]["arena_bytes"] = self.cache.arena_bytes
        data["cache"]["streamed_bytes"] = self.cache.streamed_bytes
        return data

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=1)


def cache_entries(shape: ModelShape, cache_format: str,
                  dtype: torch.dtype) -> List[Tuple[str, int, int]]:
    """[(name, held bytes, copy bytes)] in execution order, as the runtime computes them."""
    entries = []
    for linear in shape.linears:
        spec = shape.spec_of(linear)
        weight = _meta_weight(spec, linear)
        entries.append((linear.name, held_nbytes(weight, cache_format, dtype),
                        spec.nbytes(linear.out_features, linear.in_features)))
    return entries


def _meta_weight(spec: QuantSpec, linear: LinearShape) -> QuantizedWeight:
    return meta_weight(spec, linear.out_features, linear.in_features)


# ----- sizing -------------------------------------------------------------------------------
def kv_bytes_per_token(shape: ModelShape, itemsize: int) -> int:
    """K and V of every layer for one token of one sequence."""
    return shape.num_layers * 2 * shape.kv_heads * shape.head_dim * itemsize


def activation_bytes(shape: ModelShape, request: PlanRequest, itemsize: int) -> int:
    """ESTIMATE of the activation peak, which is the prefill of a whole --context at once.

    Live tensors per prompt token: about four hidden-sized ones (residual, norm output,
    attention output, q) plus three intermediate-sized ones (gate, up, their product);
    attention scores are not materialised (flash / SDPA). Plus float32 logits of the
    last position, and on CUDA with packed weights the prefill kernel's dequant scratch.
    """
    tokens = request.context * request.batch
    per_token = (4 * shape.hidden_size + 3 * shape.intermediate_size) * itemsize
    logits = 2 * request.batch * shape.vocab_size * LOGITS_BYTES
    scratch = 0
    if request.profile.device == "cuda" and request.resolved_cache_format() == "packed":
        largest = max((lin.out_features * lin.in_features for lin in shape.linears), default=0)
        scratch = min(largest, PREFILL_SCRATCH_MAX_ELEMENTS) * itemsize
    return tokens * per_token + logits + scratch


def fixed_memory(shape: ModelShape, request: PlanRequest) -> Memory:
    """Every device byte except the weight arena (filled in by :func:`make_plan`)."""
    itemsize = request.torch_dtype().itemsize
    kv = kv_layout_for(shape, request.kv_cache, itemsize)
    host_store = 0
    if request.profile.device == "cpu":  # the INT4 store shares the same RAM
        host_store = sum(shape.spec_of(lin).nbytes(lin.out_features, lin.in_features)
                         for lin in shape.linears)
        experts = expert_sizes(shape, request.resolved_cache_format(), request.torch_dtype())
        host_store += experts.total_copy if experts else 0
    if request.embeddings == "host" and shape.tied_embeddings:
        raise ConfigError("--embeddings host needs untied embeddings: this model's lm_head "
                          "shares the embedding matrix, which must then be on the device")
    on_device = request.embeddings == "device" or request.profile.device == "cpu"
    return Memory(
        resident_weights=0, staging_ring=0,
        embeddings=shape.embedding_elements * itemsize if on_device else 0,
        other_dense=shape.other_dense_elements * itemsize,
        kv_cache=kv.cache_bytes(request.context, request.batch),
        kv_cache_per_token=kv.token_bytes(),
        activations=activation_bytes(shape, request, itemsize),
        reserve=request.profile.reserve_bytes, host_store=host_store,
        draft=request.draft_bytes,
    )


# ----- the plan -----------------------------------------------------------------------------
def make_plan(shape: ModelShape, request: PlanRequest) -> Plan:
    """Size everything, split the arena with the runtime's policy, predict the speed."""
    if request.dtype == "auto":  # made concrete once: every size below counts with it
        request = replace(request, dtype=str(request.torch_dtype(shape.spec))[len("torch."):])
    fmt, dtype = request.resolved_cache_format(shape.spec), request.torch_dtype()
    entries = cache_entries(shape, fmt, dtype)
    memory = fixed_memory(shape, request)
    floor = plan_cache(entries, None, request.policy, request.prefetch_depth)
    moe = expert_sizes(shape, fmt, dtype)
    minimum_budget = floor.minimum_budget + (moe.floor if moe else 0)
    every_weight = floor.total_bytes + (moe.total_held if moe else 0)
    usable = request.profile.usable_bytes
    given, budget = request.explicit_budget()
    if request.cache_entries is not None:
        given, source = True, f"--cache-entries {request.cache_entries}"
    elif given:
        source = "--gpu-budget"
    else:  # what the card leaves once everything else has its share
        source = "derived from the profile"
        room = usable - memory.fixed
        budget = None if room >= every_weight else max(room, minimum_budget)
        if room < minimum_budget:
            source = "the policy's minimum: the card has no room left for weights"
    cache, experts = plan_with_experts(
        entries, budget, request.policy, request.prefetch_depth, request.cache_entries,
        moe.layers if moe else [], moe.num_experts if moe else 0,
        moe.held_bytes if moe else 0, request.expert_policy)
    memory.resident_weights = cache.resident_bytes
    memory.staging_ring = cache.slot_count * cache.slot_bytes
    memory.expert_slots = experts.arena_bytes
    minimum_memory = minimum_budget + memory.fixed + memory.reserve
    all_resident = every_weight + memory.fixed + memory.reserve
    lm_head = sum(nbytes for (_, _, nbytes), linear in zip(entries, shape.linears, strict=True)
                  if linear.is_lm_head)
    plan = Plan(
        model=_model_facts(shape),
        hardware=asdict(request.profile),
        settings=dict(policy=request.policy, prefetch_depth=request.prefetch_depth,
                      cache_format=fmt, dtype=str(dtype).replace("torch.", ""),
                      context=request.context, batch=request.batch,
                      kv_cache=request.kv_cache,
                      budget_bytes=budget, budget_source=source),
        weights=dict(linear_layers=floor.total_copy_bytes - lm_head, lm_head=lm_head,
                     experts=moe.total_copy if moe else 0,
                     expert_bytes=moe.copy_bytes if moe else 0,
                     total_copy=floor.total_copy_bytes + (moe.total_copy if moe else 0),
                     total_held=every_weight),
        memory=memory, cache=cache, experts=experts if moe else None,
        minimum_budget=minimum_budget,
        minimum_memory=minimum_memory, all_resident_memory=all_resident,
        prediction=predict(cache, shape, request, memory, moe, experts),
        fits=memory.total <= request.profile.memory_bytes,
        weight_names=[name for name, _, _ in entries],
    )
    add_placement(plan, entries, shape, request, budget)
    return add_disk_tier(plan, entries, request.host_budget, request.profile.disk_read_bandwidth)


def _model_facts(shape: ModelShape) -> Dict[str, object]:
    facts = asdict(shape)
    facts.pop("linears")
    facts["spec"] = {"scheme": shape.spec.scheme, "group_size": shape.spec.group_size}
    facts["quantized_linears"] = len(shape.linears)
    facts["total_params"] = shape.total_params
    facts["active_params"] = shape.active_params
    if shape.experts is not None:
        facts["experts"].pop("layers")
        facts["experts"]["layers"] = len(shape.experts.layers)
    return facts


def predict(cache: CachePlan, shape: ModelShape, request: PlanRequest, memory: Memory,
            moe: Optional[ExpertSizes] = None,
            experts: Optional[ExpertPlan] = None) -> Prediction:
    """The bandwidth model of one decode step (a PREDICTION, see the module docstring)."""
    profile = request.profile
    count = len(shape.linears)
    if request.policy == "static":
        streamed = cache.streamed_bytes
        hit_rate = len(cache.resident) / count if count else 1.0
    else:  # lru under cyclic access: it hits only when every weight has a slot
        everything_fits = cache.slot_count >= count
        streamed = 0 if everything_fits else cache.total_copy_bytes
        hit_rate = 1.0 if everything_fits else 0.0
    read_bandwidth = weight_read_bandwidth(profile)
    resident_read = cache.resident_bytes / read_bandwidth
    if request.policy == "lru" and streamed == 0:
        resident_read = cache.total_bytes / read_bandwidth
    dense = memory.other_dense + (memory.embeddings if shape.tied_embeddings else 0)
    dense_read = dense / profile.device_bandwidth
    stream = streamed / profile.h2d_bandwidth
    kv = kv_layout_for(shape, request.kv_cache, request.torch_dtype().itemsize)
    kv_read = kv.step_traffic_bytes(request.context, request.batch) / profile.device_bandwidth
    overhead = decode_overhead(shape, profile)
    moe_facts = _expert_prediction(moe, experts, request, read_bandwidth)
    streamed += moe_facts.get("expert_stream_bytes_per_step", 0)
    stream = streamed / profile.h2d_bandwidth
    step = (resident_read + dense_read + stream + kv_read + overhead.seconds
            + moe_facts.get("expert_read_s", 0.0))
    return Prediction(
        resident_read_s=resident_read, dense_read_s=dense_read, stream_s=stream,
        kv_read_s=kv_read, step_s=step,
        tokens_per_s=request.batch / step if step else float("inf"),
        tokens_per_s_per_sequence=1 / step if step else float("inf"),
        streamed_bytes_per_step=streamed, streamed_bytes_per_token=streamed / request.batch,
        hit_rate=hit_rate, overhead_s=overhead.seconds, ops_per_step=overhead.ops_per_step,
        **moe_facts,
    )


def _expert_prediction(moe, experts, request: PlanRequest, read_bandwidth: float) -> dict:
    if moe is None:
        return {}
    hit_rate = expert_hit_rate(experts, request.expert_hit_rate)
    traffic = expert_traffic(moe, hit_rate, request.batch)
    return {"expert_hit_rate": hit_rate, "experts_per_step": traffic["experts_per_step"],
            "expert_stream_bytes_per_step": traffic["expert_stream_bytes"],
            "expert_read_s": traffic["expert_read_bytes"] / read_bandwidth}
