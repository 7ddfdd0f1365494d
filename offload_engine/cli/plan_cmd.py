"""``offload-engine plan MODEL``: will this model fit on my card, and how fast? (a prediction)

The flags below mirror the engine flags of options.py by name, but they describe a
hardware profile's device, not this machine's, so they are declared here: a
fraction budget is a share of the profile's memory, and ``--device`` has no meaning.
"""

from __future__ import annotations

import json
import re
from typing import Dict, List, Tuple

from ..planning.profiles import DEFAULT_PROFILE
from ..planning.words import CACHE_FORMATS, DTYPE_NAMES, EXPERT_POLICIES, PLACEMENTS, POLICIES
from ..quant.schemes import DEFAULT_GROUP_SIZE, DEFAULT_SCHEME, GROUP_SIZES, SCHEMES
from . import plan_placement, plan_speculation
from .options import add_kv_cache_arg

DOES_NOT_FIT = 1  # exit status when the model cannot run on the profile as asked


def register(commands) -> None:
    parser = commands.add_parser(
        "plan", help="predict memory use and decode speed for a model on a card",
        description="Size a quantized directory, or a bare Hugging Face config.json (plan "
                    "before downloading), against a hardware profile. Speeds are PREDICTIONS "
                    f"of a bandwidth model. Exit status {DOES_NOT_FIT} when it does not fit.")
    parser.add_argument("model",
                        help="a directory written by `quantize`, an HF model directory, id "
                             "(ORG/NAME, in the local HF cache) or cache folder "
                             "(models--ORG--NAME), a config.json, or a built-in name as "
                             "`synth` takes (qwen2.5-32b, llama-3-8b, ...)")
    parser.add_argument("--hw-profile", default=DEFAULT_PROFILE, metavar="NAME|PATH",
                        help=f"a preset (rtx3090, rtx4090, rtx4060ti-16gb, rtx3060-12gb, "
                             f"rtx4060-8gb, cpu) or a TOML file; default {DEFAULT_PROFILE}")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--gpu-budget", default=None, metavar="B",
                        help="arena bytes (10GiB), a share of the card after its reserve (0.8) "
                             "or 'unbounded'; default: what the card leaves free")
    budget.add_argument("--cache-entries", type=int, default=None, metavar="N",
                        help="budget as N slots of the largest weight")
    parser.add_argument("--context", type=int, default=4096, metavar="T",
                        help="tokens per sequence, for the KV cache and prefill (default 4096)")
    parser.add_argument("--batch", type=int, default=1, metavar="N",
                        help="sequences decoded together (default 1)")
    parser.add_argument("--scheme", choices=SCHEMES, default=None,
                        help="for a config.json: the scheme to plan for "
                             f"(default {DEFAULT_SCHEME})")
    parser.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=None,
                        help="for a config.json: the group size "
                             f"(default {DEFAULT_GROUP_SIZE})")
    parser.add_argument("--policy", choices=POLICIES, default="static")
    parser.add_argument("--prefetch-depth", type=int, default=2, metavar="K")
    parser.add_argument("--cache-format", choices=("auto",) + CACHE_FORMATS, default="auto",
                        help="auto: packed on a cuda profile, dequantized on cpu")
    parser.add_argument("--dtype", choices=("auto",) + DTYPE_NAMES, default="auto",
                        help="compute dtype; auto: bfloat16 on a cuda profile, and on cpu for "
                             "int4 schemes, else float32")
    parser.add_argument("--embeddings", choices=("device", "host"), default="device",
                        help="host: plan for the token embedding table kept in host RAM")
    parser.add_argument("--host-budget", default=None, metavar="B",
                        help="host RAM for weights (16GiB); the rest is read from disk every "
                             "token. Default: unbounded (every weight in RAM)")
    parser.add_argument("--placement", choices=PLACEMENTS, default="auto",
                        help="where decoder layer parts run: auto (the faster prediction of "
                             "streaming and computing on the CPU what does not fit), stream, "
                             "cpu, mlp-cpu")
    add_kv_cache_arg(parser)
    parser.add_argument("--expert-hit-rate", type=float, default=None, metavar="H",
                        help="mixture-of-experts models: the expert cache hit rate to predict "
                             "with, 0 to 1 (as `run` measures it); default: expert slots per "
                             "layer / experts per layer (uniform routing, an estimate)")
    parser.add_argument("--expert-policy", choices=EXPERT_POLICIES, default="lfu")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan_speculation.add_args(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    from ..checkpoint.model_ref import resolve_model_path
    from ..model.presets import is_preset
    from ..planning.overhead import figure_sources
    from ..planning.planner import PlanRequest, describe_model, make_plan
    from ..planning.profiles import load_profile
    from ..quant.layout import QuantSpec

    spec = None
    if args.scheme is not None or args.group_size is not None:
        spec = QuantSpec(args.scheme or DEFAULT_SCHEME, args.group_size or DEFAULT_GROUP_SIZE)
    request = PlanRequest(
        profile=load_profile(args.hw_profile), gpu_budget=args.gpu_budget,
        cache_entries=args.cache_entries, context=args.context, batch=args.batch,
        policy=args.policy, prefetch_depth=args.prefetch_depth,
        cache_format=args.cache_format, dtype=args.dtype, embeddings=args.embeddings,
        host_budget=args.host_budget, kv_cache=args.kv_cache, placement=args.placement,
        expert_hit_rate=args.expert_hit_rate, expert_policy=args.expert_policy)
    request.draft_bytes = plan_speculation.draft_bytes(args, request)
    shape = describe_model(args.model if is_preset(args.model) else
                           resolve_model_path(args.model), spec)
    plan = make_plan(shape, request)
    report_speculation = plan_speculation.predict(args, plan, request)
    report = plan.as_dict()
    report["resident_summary"] = summarise_weights(plan.cache.resident, plan.weight_names)
    streamed = [n for n in plan.weight_names if n not in set(plan.cache.resident)]
    report["streamed_summary"] = summarise_weights(streamed, plan.weight_names)
    report["advice"] = advise(plan, shape, request)
    report["figures"] = figure_sources(request.profile)
    report["speculation"] = report_speculation
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print("\n".join(render(plan, report)))
    return 0 if plan.fits else DOES_NOT_FIT


def size(nbytes: float) -> str:
    """Decimal units, as the issue, vendors and the design notes quote sizes."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} B"


def card(nbytes: float) -> str:
    """A card-sized amount in both units: vendors' "24 GB" cards hold 24 GiB."""
    return f"{size(nbytes)} ({nbytes / 2**30:.2f} GiB)"


def render(plan, report: dict) -> List[str]:
    """The plan as text: sizes, what stays resident, and the labelled prediction."""
    model, hw, settings = plan.model, plan.hardware, plan.settings
    mem, pred = plan.memory, plan.prediction
    spec = model["spec"]
    lines = [
        f"model:    {model['source']} ({model['model_type']}, {model['num_layers']} layers, "
        f"{model['quantized_linears']} quantized linears, {spec['scheme']} "
        f"g{spec['group_size']})",
        f"hardware: {hw['name']}: {hw['description']}",
        f"          {card(hw['memory_bytes'])} memory, {hw['device_bandwidth'] / 1e9:.0f} GB/s "
        f"device, {hw['h2d_bandwidth'] / 1e9:.2f} GB/s host->device",
        f"settings: policy {settings['policy']}, prefetch depth {settings['prefetch_depth']}, "
        f"cache format {settings['cache_format']}, {settings['dtype']}, context "
        f"{settings['context']} x batch {settings['batch']}",
        "",
        f"weights ({spec['scheme']} g{spec['group_size']}, copied from host RAM):",
        f"  linear weights in the layers  {size(plan.weights['linear_layers']):>10}",
        f"  lm_head                       {size(plan.weights['lm_head']):>10}"
        + ("  (tied to the embeddings: dense)" if model["tied_embeddings"] else ""),
        *_expert_weight_lines(plan),
        "device memory:",
    ]
    rows = _memory_rows(plan)
    lines += [f"  {label:<28}{size(n):>10}  {note}".rstrip() for label, n, note in rows]
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines += [
        f"  {'total':<28}{size(mem.total):>10}  of {card(hw['memory_bytes'])}: {verdict}",
        f"  budget: {_budget(settings)}",
        "",
        f"resident: {report['resident_summary']}",
        f"streamed: {report['streamed_summary']}",
        f"minimum workable budget: {size(plan.minimum_budget)} of weights "
        f"(a {card(plan.minimum_memory)} card);",
        f"  every weight resident: a {card(plan.all_resident_memory)} card",
        "",
        "PREDICTION (bandwidth + op-overhead model, not a measurement):",
        f"  streamed per token: {size(pred.streamed_bytes_per_token)} host->device, "
        f"hit rate {pred.hit_rate:.1%}",
        f"  per step: resident reads {pred.resident_read_s * 1e3:.2f} ms + dense reads "
        f"{pred.dense_read_s * 1e3:.2f} ms + streaming {pred.stream_s * 1e3:.2f} ms + KV "
        f"reads {pred.kv_read_s * 1e3:.2f} ms + op overhead {pred.overhead_s * 1e3:.2f} ms "
        f"= {pred.step_s * 1e3:.2f} ms",
        *overhead_lines(plan, report),
        *_expert_prediction_lines(plan),
        f"  predicted decode: {pred.tokens_per_s:.3g} tokens/s"
        + (f" in all ({pred.tokens_per_s_per_sequence:.3g} per sequence)"
           if settings["batch"] > 1 else ""),
    ]
    lines[-1:-1] = _host_lines(plan)
    lines += plan_placement.render(plan, size)
    lines += plan_speculation.render(report.get("speculation"), size)
    lines += [f"note: {text}" for text in report["advice"] + plan.host.get("notes", [])]
    return lines


def _expert_weight_lines(plan) -> List[str]:
    """A mixture-of-experts model's experts and parameter counts (nothing for dense)."""
    experts = plan.model.get("experts")
    if not experts:
        return []
    layers, count, top_k = experts["layers"], experts["num_experts"], experts["experts_per_token"]
    return [
        f"  experts ({layers} layers x {count}, {top_k} per token)"
        f"{size(plan.weights['experts']):>10}  {size(plan.weights['expert_bytes'])} per expert",
        f"  parameters: {plan.model['total_params'] / 1e9:.2f}B in all, "
        f"{plan.model['active_params'] / 1e9:.2f}B active per token",
    ]


def _expert_prediction_lines(plan) -> List[str]:
    pred, experts = plan.prediction, plan.experts
    if experts is None:
        return []
    return [f"  experts: {pred.experts_per_step} picked per step, "
            f"{experts.slots_per_layer} of {experts.num_experts} slots per layer, hit rate "
            f"{pred.expert_hit_rate:.1%} -> {size(pred.expert_stream_bytes_per_step)} of them "
            f"streamed per step (included above; reading them on the device "
            f"{pred.expert_read_s * 1e3:.2f} ms)"]


def _host_lines(plan) -> List[str]:
    """The disk tier's share of the prediction, when --host-budget leaves weights on disk."""
    host, pred = plan.host, plan.prediction
    if not host or host["budget_bytes"] is None:
        return []
    speed = host["disk_read_bandwidth"]
    return [
        f"  host RAM: {size(host['ram_bytes'])} of weights ({host['weights_in_ram']}) + "
        f"{host['ring_slots']} disk buffers {size(host['ring_bytes'])}, budget "
        f"{size(host['budget_bytes'])} (minimum {size(host['minimum_budget'])})",
        f"  read from disk per token: {size(host['disk_bytes_per_step'])} "
        f"({host['weights_on_disk']} weights)"
        + (f" at {speed / 1e9:.2f} GB/s = {pred.disk_read_s * 1e3:.2f} ms, overlapping the "
           "streaming (the slower of the two counts)" if speed else ""),
    ]
def overhead_lines(plan, report: dict) -> List[str]:
    """How the op overhead was reached, and which profile figures are measured."""
    pred, hw = plan.prediction, plan.hardware
    ops = ("not counted" if pred.ops_per_step is None
           else f"{pred.ops_per_step} ops per step (counted on a tiny model of this architecture)")
    figures = report["figures"]
    return [f"  op overhead: {ops} x {hw['op_overhead_s'] * 1e6:.2f} us per op",
            f"  measured on the card: {', '.join(figures['measured']) or 'none'}",
            f"  estimated: {'; '.join(figures['estimated']) or 'none'}"]


def _memory_rows(plan) -> List[Tuple[str, int, str]]:
    """(label, bytes, note) for every kind of device memory."""
    mem, cache, settings, hw = plan.memory, plan.cache, plan.settings, plan.hardware
    rows = [
        ("resident weights", mem.resident_weights, f"{len(cache.resident)} of "
         f"{len(plan.weight_names)} weights"),
        ("staging ring", mem.staging_ring, f"{cache.slot_count} slots x "
         f"{size(cache.slot_bytes)}"),
        ("embeddings", mem.embeddings, "on the device (--embeddings host frees it)"
         if mem.embeddings else "in host RAM (--embeddings host)"),
        ("norms, biases", mem.other_dense, ""),
        ("KV cache", mem.kv_cache, f"{settings['kv_cache']}: {mem.kv_cache_per_token / 1024:.1f}"
         f" KiB per token x {settings['context']} x {settings['batch']}"
         + (" + one layer dequantized" if settings["kv_cache"] != "bf16" else "")),
        ("activations (estimate)", mem.activations, "prefill of the whole context"),
        ("reserve", mem.reserve, "CUDA context, workspace" if hw["device"] == "cuda"
         else "OS, Python, torch"),
    ]
    if plan.experts is not None:
        rows.insert(2, ("expert slots", mem.expert_slots,
                        f"{plan.experts.slots_per_layer} per layer x "
                        f"{len(plan.experts.layers)} layers x {size(plan.experts.slot_bytes)}"))
    if mem.draft:
        rows.append(("draft model", mem.draft, "--draft-model, every weight resident"))
    if mem.host_store:
        rows.append(("host store (INT4)", mem.host_store, "same RAM as the cpu 'device'"))
    return rows


def _budget(settings: dict) -> str:
    value = settings["budget_bytes"]
    shown = "unbounded (every weight resident)" if value is None else size(value)
    return f"{shown}, {settings['budget_source']}"


def summarise_weights(chosen: List[str], order: List[str]) -> str:
    """Group weight names by layer: "layers 0-37: all linears; layer 38: q_proj; lm_head"."""
    if not chosen:
        return "none"
    chosen_set = set(chosen)
    per_layer: Dict[int, Tuple[List[str], List[str]]] = {}
    others = []
    for name in order:
        match = re.search(r"\.layers\.(\d+)\.(.+)$", name)
        if match is None:
            others += [name] if name in chosen_set else []
            continue
        every, picked = per_layer.setdefault(int(match.group(1)), ([], []))
        every.append(match.group(2).rsplit(".", 1)[-1])
        if name in chosen_set:
            picked.append(every[-1])
    runs: List[list] = []  # [first layer, last layer, label]
    for layer in sorted(per_layer):
        every, picked = per_layer[layer]
        if not picked:
            continue
        label = "all linears" if picked == every else ", ".join(picked)
        if runs and runs[-1][1] == layer - 1 and runs[-1][2] == label:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer, label])
    parts = [(f"layers {a}-{b}" if a != b else f"layer {a}") + f": {label}"
             for a, b, label in runs]
    return "; ".join(parts + others)


def advise(plan, shape, request) -> List[str]:
    """What to change when the plan does not fit, or what more memory would buy."""
    mem, limit = plan.memory, request.profile.memory_bytes
    advice = []
    if shape.max_positions and request.context > shape.max_positions:
        advice.append(f"--context {request.context} exceeds the model's "
                      f"max_position_embeddings ({shape.max_positions})")
    if not plan.fits:
        advice.append(f"DOES NOT FIT: needs {card(mem.total)} on a {card(limit)} card")
        if plan.minimum_memory > limit:
            advice.append(
                f"even the minimum arena needs a {card(plan.minimum_memory)} card: lower "
                f"--context or --batch (KV cache {size(mem.kv_cache)}, activations "
                f"{size(mem.activations)}), lower --prefetch-depth (each slot "
                f"{size(plan.cache.slot_bytes or plan.minimum_budget)}), or use a card with "
                "more memory")
        else:
            advice.append("lower --gpu-budget, or leave it out to use what the card leaves free")
    elif plan.cache.streamed_bytes and request.policy == "static":
        advice.append(f"every weight resident would need a {card(plan.all_resident_memory)} "
                      "card (or a shorter --context)")
    return advice
