"""Runtime assembly: quantized directory -> host store -> device cache -> patched model."""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint.format import verify_directory
from ..checkpoint.hfconfig import check_tokenizer_files, read_hf_config
from ..checkpoint.synth import synthetic_note
from ..errors import ConfigError, FormatError
from ..kernels.gateway import prepare_cpu_kernels
from ..model import architecture
from ..model.experts import expert_linears, find_experts
from ..planning.expert_policy import expert_slot_bytes, plan_with_experts
from ..planning.host_policy import host_summary, plan_host
from ..planning.moe_placement import check_moe_placement
from ..planning.placement import EXPERTS_CPU, Placement, place_parts, split_parts
from ..planning.sizes import held_nbytes
from .attention import attention_for
from .boundary import BoundaryStats, HostWeights
from .cache import DeviceCache
from .config import EngineConfig
from .experts import OffloadedExperts
from .kv_cache import kv_layout_from_config, new_kv_cache
from .linear import OffloadedLinear
from .patch import load_dense, place_and_finish, swap_experts, swap_linears
from .store import HostStore, check_float_components, module_name, read_dense_tensors
from .tiered_store import default_host_budget, open_store, quantized_layouts

logger = logging.getLogger(__name__)


class Engine:
    """A loaded model: ``.model`` is a stock transformers model whose linears stream.

    Generation is added one stage up, by :class:`offload_engine.decode.api.Engine`.
    """

    synthetic_note: Optional[str] = None  # set for a `synth` model: its weights are random

    def __init__(self, directory: Path, model, tokenizer, cache: DeviceCache, store: HostStore,
                 config: EngineConfig):
        self.directory = directory
        self.model = model
        self.tokenizer = tokenizer
        self.cache = cache
        self.store = store
        self.config = config
        self.device = config.torch_device()
        self.kv_layout = kv_layout_from_config(model.config, config.kv_cache,
                                               config.torch_dtype())
        self._closed = False
        self.host_plan = None  # planning.host_policy.HostPlan, set by load()
        self.placement = None  # planning.placement.Placement, set by load()
        self.host_weights: Optional[HostWeights] = None  # CPU-placed weights, set by load()
        self.boundary = BoundaryStats()  # CPU part counters, shared with host_weights

    def new_kv_cache(self, batch: int = 1, tokens: Optional[int] = None):
        """A fresh --kv-cache for one sequence (or batch); None means transformers' default.

        With --compile, a static-shape cache for ``tokens`` per sequence (bucketed)."""
        if self.config.compile and tokens is not None:
            from .kv_static import new_static_kv_cache

            return new_static_kv_cache(self.kv_layout, self.model.config, tokens, batch,
                                       self.config.kv_budget_bytes())
        return new_kv_cache(self.kv_layout, self.config.kv_budget_bytes(), batch)

    def compile_config(self):
        """The CompileConfig of the decode step (runtime/compile_step.py), or None."""
        if not self.config.compile:
            return None
        from . import compile_step

        return compile_step.compile_config(self.device, self.cache.plan.streamed_bytes > 0)

    def count_compiled_steps(self, steps: int) -> None:
        """Count the weight uses of ``steps`` compiled decode steps that the cache did not
        see (weights traced as constants: runtime/compile_step.py)."""
        if self.config.compile:
            from . import compile_step

            compile_step.count_steps(self.cache, steps)

    @property
    def plan(self):
        return self.cache.plan

    @property
    def stats(self) -> dict:
        """Cache counters and the arena layout, as plain numbers."""
        plan = self.cache.plan
        return {
            **self.cache.stats.as_dict(),
            "policy": plan.policy,
            "prefetch_depth": plan.prefetch_depth,
            "cache_format": self.cache.cache_format,
            "arena_bytes": plan.arena_bytes,
            "resident_bytes": plan.resident_bytes,
            "streamed_bytes": plan.streamed_bytes,
            "total_copy_bytes": plan.total_copy_bytes,
            "resident_copy_bytes": plan.resident_copy_bytes,
            "total_bytes": plan.total_bytes,
            "resident_weights": len(plan.resident),
            "weights": len(self.cache.order),
            "staging_slots": plan.slot_count,
            "device": str(self.device),
            "device_name": device_name(self.device),
            **host_summary(self.host_plan),
            **self.placement_summary(),
            **(self.cache.experts.summary() if self.cache.experts else {}),
        }

    def placement_summary(self) -> dict:
        """Where layer parts run (--placement) and the CPU side's weights, as numbers."""
        if self.placement is None:
            return {}
        host = self.host_weights
        return {**self.placement.summary(),
                "cpu_weights": len(host) if host else 0,
                "cpu_weight_bytes_per_pass": host.weight_bytes if host else 0,
                "cpu_prepacked_bytes": host.prepacked_bytes if host else 0}

    def counters(self) -> dict:
        """Cache counters plus the disk reader's (``disk_read_*``), as plain numbers."""
        disk = getattr(self.store, "disk_stats", None)
        counters = {**self.cache.stats.as_dict(),
                    **({f"disk_{k}": v for k, v in disk.as_dict().items()} if disk else {}),
                    **{f"boundary_{k}": v for k, v in self.boundary.as_dict().items()}}
        if not self.cache.order:  # every weight is CPU-placed: count passes there
            counters["passes"] = self.boundary.passes
        return counters

    def close(self) -> None:
        """Stop the prefetch worker and free the arena. Safe to call twice."""
        if not self._closed:
            self._closed = True
            # transformers keeps the compiled forward on the model, a cycle back to it;
            # dropped here, the model goes with the engine and dynamo drops its guards
            self.model.__dict__.pop("_compiled_call", None)
            if self.config.compile:
                from . import compile_step

                compile_step.detach(self.model.modules())
            _close(self.cache, self.store)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU"


def load(path, config: Optional[EngineConfig] = None, *, engine_class: type = Engine,
         **overrides) -> Engine:
    """Load a quantized directory for inference.

    ``overrides`` are EngineConfig fields: ``device``, ``gpu_budget``, ``policy``,
    ``prefetch_depth``, ``cache_entries``, ``cache_format``, ``dtype``...
    ``engine_class`` lets a higher stage (decode) return its own subclass.
    """
    from transformers import AutoTokenizer

    config = replace(config or EngineConfig(), **overrides)
    directory = Path(path)
    manifest = verify_directory(directory)
    config = config.resolved(manifest.spec)  # dtype auto -> what suits this checkpoint
    device, dtype = config.torch_device(), config.torch_dtype()
    hf_config, model = _skeleton(directory, config, dtype)
    linears = architecture.find_linears(model, hf_config)
    experts = find_experts(model)
    _check_manifest_matches(manifest, {**linears, **expert_linears(experts)}, directory)
    swapped = {**swap_linears(model, linears),
               **swap_experts(model, experts, link=config.expert_prefetch == "on")}
    fmt = config.resolved_cache_format(manifest.spec)
    order = list(linears)
    layouts = quantized_layouts(manifest)
    placement = resolve_placement(config, order, layouts, directory)
    _check_combinations(config, placement, bool(experts), directory)
    prepare_cpu_kernels(_cpu_computed(layouts, placement.cpu_names, device, fmt))
    device_order = [n for n in order if n not in placement.cpu_names]
    plan, expert_plan = _plan_arena(config, directory, device_order, experts, layouts, fmt,
                                    dtype)
    expert_names = {name: {e: info.expert_modules(e) for e in range(info.num_experts)}
                    for name, info in experts.items()}
    host_plan = _host_plan(config, manifest, order, expert_names, layouts, plan, expert_plan)
    store = open_store(directory, manifest, host_plan, device.type == "cuda", config.progress)
    boundary = BoundaryStats()
    try:
        cache = DeviceCache(store, device_order, plan, device, fmt, dtype,
                            progress=config.progress,
                            experts=(expert_plan, expert_names) if experts else None,
                            expert_prefetch=config.expert_prefetch == "on",
                            experts_on_cpu=placement.chosen == EXPERTS_CPU)
    except BaseException:
        store.close()
        raise
    try:
        cold = cache.experts.cold_names() if cache.experts else []
        host = HostWeights(store, [n for n in order if n in placement.cpu_names] + cold,
                           boundary, counts_passes=not cold)
        _attach(swapped, placement, cache, host, config)
        load_dense(model, read_dense_tensors(directory, manifest), device, dtype,
                   host_names=_host_tensor_names(manifest, config))
        place_and_finish(model, [part.module for part in placement.cpu_parts], device,
                         boundary, directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except BaseException:
        _close(cache, store)
        raise
    engine = engine_class(directory, model, tokenizer, cache, store, config)
    engine.host_plan = host_plan
    engine.placement, engine.host_weights, engine.boundary = placement, host, boundary
    engine.synthetic_note = synthetic_note(manifest)
    return engine


def _cpu_computed(layouts: dict, cpu_names, device: torch.device, fmt: str) -> list:
    """The quantized weights the CPU will compute from (a dequantized cache holds dense ones)."""
    everything = device.type == "cpu" and fmt != "dequantized"
    return [layout for name, layout in layouts.items() if everything or name in cpu_names]


def _skeleton(directory: Path, config: EngineConfig, dtype: torch.dtype):
    """(hf config, the model on meta) with the attention chosen; the tokenizer files and
    the KV cache mode are checked first, before the slow part."""
    hf_config = read_hf_config(directory)
    check_tokenizer_files(directory)
    kv_layout_from_config(hf_config, config.kv_cache, dtype)
    hf_config._attn_implementation = attention_for(config, hf_config)
    return hf_config, architecture.build_skeleton(hf_config)


def _host_plan(config: EngineConfig, manifest, order, expert_names: dict, layouts, plan,
               expert_plan):
    """Which weights stay in host RAM and which are read from the shards (host_policy)."""
    streamed = [n for layer in expert_names.values() for names in layer.values() for n in names]
    return plan_host([(n, layouts[n].nbytes) for n in order + streamed],
                     plan.resident + (streamed if expert_plan.all_resident else []),
                     config.host_bytes(lambda: default_host_budget(
                         manifest, plan.arena_bytes + expert_plan.arena_bytes,
                         config.torch_device())))


def _check_combinations(config: EngineConfig, placement: Placement, moe: bool,
                        directory: Path) -> None:
    """What the compiled step and the expert cache cannot hold yet, refused before any work."""
    if config.compile and placement.cpu_names:
        raise ConfigError("--compile runs the decode step as one graph on the device; "
                          f"--placement {config.placement} computes layer parts on the CPU, "
                          "which it cannot hold yet: use --placement stream or drop --compile")
    check_moe_placement(config.placement, moe, directory.name)
    if moe and config.compile:
        raise ConfigError(f"{directory.name} is a mixture-of-experts model: its experts run "
                          "from the expert cache, which --compile cannot hold yet; drop it")


def _attach(swapped: dict, placement: Placement, cache: DeviceCache, host: HostWeights,
            config: EngineConfig) -> None:
    """Each swapped module to what serves its weights: the expert cache, the host (CPU
    placement) or the device cache; with --compile, through the custom op."""
    for name, module in swapped.items():
        if isinstance(module, OffloadedExperts):
            module.attach(cache.experts, host if placement.chosen == EXPERTS_CPU else None)
        else:
            module.attach(host if name in placement.cpu_names else cache)
    if config.compile:
        from . import compile_step

        compile_step.attach(swapped.values(), cache)


def _close(cache: DeviceCache, store: HostStore) -> None:
    # The store first: a prefetch worker waiting on the disk reader is woken with an error.
    try:
        store.close()
    finally:
        cache.close()


def _host_tensor_names(manifest, config: EngineConfig) -> frozenset:
    if config.embeddings != "host":
        return frozenset()
    return frozenset(name for name, entry in manifest.tensors.items() if entry.role == "embedding")


def resolve_placement(config: EngineConfig, order, layouts, directory: Path) -> Placement:
    """--placement: stream, cpu and mlp-cpu as asked; auto decides with the planner's
    placement for --hw-profile on CUDA, and streams otherwise (on a CPU device the cache
    already computes on the CPU from host RAM)."""
    parts = split_parts([(n, layouts[n].nbytes) for n in order])
    if config.placement != "auto":
        return place_parts(parts, config.placement)
    if config.torch_device().type == "cpu" or config.hw_profile is None:
        reason = ("the device is the CPU" if config.torch_device().type == "cpu"
                  else "no --hw-profile to predict with")
        return Placement("auto", "stream", [], parts, reason=reason)
    return _profile_plan(config, directory).placement_plan


def weight_budget(config: EngineConfig, directory: Path) -> Optional[int]:
    """The arena budget: the flag's, or the one `plan` derives for --hw-profile."""
    if config.hw_profile is None or config.gpu_budget is not None or config.cache_entries:
        return config.budget_bytes()
    plan = _profile_plan(config, directory)
    budget = plan.settings["budget_bytes"]
    logger.info("--hw-profile %s: weight budget %s (%s)", config.hw_profile, budget,
                plan.settings["budget_source"])
    return budget


def _profile_plan(config: EngineConfig, directory: Path):
    """What `plan` answers for this directory and --hw-profile."""
    from ..planning.planner import PlanRequest, describe_model, make_plan
    from ..planning.profiles import load_profile

    shape = describe_model(directory)
    context = min(PlanRequest.context, shape.max_positions or PlanRequest.context)
    request = PlanRequest(load_profile(config.hw_profile), context=context,
                          policy=config.policy, prefetch_depth=config.prefetch_depth,
                          cache_format=config.resolved_cache_format(shape.spec),
                          embeddings=config.embeddings, kv_cache=config.kv_cache,
                          dtype=str(config.torch_dtype()).replace("torch.", ""),
                          placement=config.placement)
    return make_plan(shape, request)


def check_loadable(directory: Path, manifest) -> None:
    """Everything :func:`load` refuses a directory for, without loading it: the config,
    the tokenizer files, the manifest's linears against the model's, and NaN or Inf in
    any float tensor. For ``inspect``; the shards themselves are checked by the caller."""
    hf_config = read_hf_config(directory)
    check_tokenizer_files(directory)
    model = architecture.build_skeleton(hf_config)
    linears = architecture.find_linears(model, hf_config)
    _check_manifest_matches(manifest, {**linears, **expert_linears(find_experts(model))},
                            directory)
    check_float_components(directory, manifest)


def _names(names: set) -> str:
    """Up to 3 sorted names, and how many more there are."""
    shown = sorted(names)[:3]
    more = len(names) - len(shown)
    return f"{shown}" + (f" and {more} more" if more else "")


def _check_manifest_matches(manifest, linears, directory: Path) -> None:
    quantized = {module_name(n) for n, e in manifest.tensors.items() if e.quantized}
    missing, extra = set(linears) - quantized, quantized - set(linears)
    if missing or extra:
        raise FormatError(
            f"{directory}: the manifest's quantized weights do not match the model's linears "
            f"({len(missing)} missing: {_names(missing)}; {len(extra)} unexpected: "
            f"{_names(extra)}); re-convert it"
        )


def _plan_arena(config: EngineConfig, directory: Path, order, experts, layouts, fmt: str,
                dtype):
    """The weight cache's plan and the expert slots', from the one budget."""
    plan, expert_plan = plan_with_experts(
        [(n, held_nbytes(layouts[n], fmt, dtype), layouts[n].nbytes) for n in order],
        weight_budget(config, directory), config.policy, config.prefetch_depth,
        config.cache_entries, list(experts), _expert_count(experts),
        _expert_slot_bytes(experts, layouts, fmt, dtype), config.expert_policy)
    logger.info("cache plan: %s", asdict(plan))
    return plan, expert_plan


def _expert_count(experts) -> int:
    counts = {info.num_experts for info in experts.values()}
    if len(counts) > 1:
        raise FormatError(f"experts layers with different expert counts {sorted(counts)} are "
                          "not supported")
    return counts.pop() if counts else 0


def _expert_slot_bytes(experts, layouts, fmt: str, dtype) -> int:
    """Arena bytes of the largest expert (all its matrices)."""
    return max((expert_slot_bytes([held_nbytes(layouts[n], fmt, dtype)
                                   for n in info.expert_modules(e)])
                for info in experts.values() for e in range(info.num_experts)), default=0)


def offloaded_modules(model) -> list:
    return [m for m in model.modules() if isinstance(m, OffloadedLinear)]
