"""Measure the engine across budgets, policies, prefetch depths and batch sizes.

Each point loads the real engine, warms it up, generates a fixed number of greedy tokens
and records what :class:`GenerationStats` measured (every field, so fields added later
flow into the tables), plus the achieved host->device rate, next to the planner's
PREDICTION for the same settings (its op-overhead term in a column of its own).
Batch sizes above 1 decode the same prompt for every sequence with ``model.generate``.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import logging
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from ..errors import ConfigError
from ..planning.planner import PlanRequest, make_plan
from ..runtime.cache import expert_counters
from ..runtime.config import EngineConfig
from ..units import parse_bytes
from .api import load

logger = logging.getLogger(__name__)
DEFAULT_PROMPT = "The three most important ideas in computer science are"


@dataclass(frozen=True)
class BenchPoint:
    """One measured configuration."""

    policy: str
    budget: str  # the label asked for: min, 50%, 0.5, 8GiB, unbounded
    budget_bytes: Optional[int]  # resolved arena budget; None: unbounded
    prefetch_depth: int
    batch: int


def parse_list(text: str, kind=str) -> list:
    items = [part.strip() for part in str(text).split(",") if part.strip()]
    if not items:
        raise ConfigError(f"empty list {text!r}")
    try:
        return [kind(item) for item in items]
    except ValueError as exc:
        raise ConfigError(f"cannot read {text!r}: {exc}") from exc


def resolve_budget(label: str, total: int, minimum: int) -> Optional[int]:
    """Bytes for one budget label; None when every weight fits (unbounded).

    ``min`` is the policy's minimum, ``N%`` or a fraction ``0.N`` a share of all cached
    weight bytes, otherwise a size such as ``8GiB``; never below the minimum.
    """
    text = label.strip().lower()
    if text in ("unbounded", "none", "inf", "all"):
        return None
    if text == "min":
        value = minimum
    elif text.endswith("%"):
        value = int(float(text[:-1]) / 100 * total)
    elif text.replace(".", "", 1).isdigit() and float(text) <= 1:
        value = int(float(text) * total)
    else:
        try:
            value = parse_bytes(text)
        except Exception as exc:  # argparse.ArgumentTypeError
            raise ConfigError(f"--budgets: cannot read {label!r} ({exc}); give min, N%, 0.N, "
                              "a size such as 8GiB, card:NAME or unbounded") from None
    value = max(value, minimum)
    return None if value >= total else value


def check_budget_labels(labels: List[str]) -> None:
    """Refuse a --budgets item that is no budget, before any model is read."""
    for label in labels:
        if not label.lower().startswith("card:"):
            resolve_budget(label, 2**62, 0)


def sweep_points(shape, profile, base: EngineConfig, budgets: List[str], policies: List[str],
                 depths: List[int], batches: List[int]) -> List[BenchPoint]:
    """Every combination, minus budgets that resolve to the same bytes."""
    points = []
    for policy, depth in itertools.product(policies, depths):
        floor = make_plan(shape, _request(shape, profile, base, policy, depth, None, 1, 64))
        seen = set()
        for label in budgets:
            if label.lower().startswith("card:"):
                value = card_budget(shape, label[5:], base, policy, depth)
            else:
                value = resolve_budget(label, floor.weights["total_held"], floor.minimum_budget)
            if value in seen:
                continue
            seen.add(value)
            points += [BenchPoint(policy, label, value, depth, batch) for batch in batches]
    return points


def card_budget(shape, profile_name: str, config: EngineConfig, policy: str,
                depth: int) -> Optional[int]:
    """The weight budget `plan` derives for a card (as `run --hw-profile` uses it): what a
    16 GB card leaves for weights once KV cache, activations and reserve have their share."""
    from ..planning.profiles import load_profile

    card = load_profile(profile_name)
    context = min(PlanRequest.context, shape.max_positions or PlanRequest.context)
    request = _request(shape, card, config, policy, depth, None, 1, context)
    request.gpu_budget = None  # derived from the card, not given
    return make_plan(shape, request).settings["budget_bytes"]


def _request(shape, profile, config: EngineConfig, policy: str, depth: int,
             budget: Optional[int], batch: int, context: int) -> PlanRequest:
    return PlanRequest(profile, gpu_budget="unbounded" if budget is None else budget,
                       context=context, batch=batch, policy=policy, prefetch_depth=depth,
                       cache_format=config.resolved_cache_format(shape.spec),
                       dtype=str(config.torch_dtype()).replace("torch.", ""),
                       embeddings=config.embeddings)


def predict(shape, profile, config: EngineConfig, point: BenchPoint, context: int) -> dict:
    plan = make_plan(shape, _request(shape, profile, config, point.policy,
                                     point.prefetch_depth, point.budget_bytes, point.batch,
                                     context))
    pred = plan.prediction
    return {"predicted_tokens_per_s": pred.tokens_per_s,
            "predicted_bytes_per_token": pred.streamed_bytes_per_token,
            "predicted_hit_rate": pred.hit_rate,
            "predicted_step_ms": pred.step_s * 1e3,
            "predicted_overhead_ms": pred.overhead_s * 1e3,
            "predicted_ops_per_step": pred.ops_per_step,
            "predicted_total_bytes": plan.cache.total_bytes}


def measure(model: Path, config: EngineConfig, point: BenchPoint, prompt: str,
            tokens: int) -> dict:
    """One real run at ``point``: GenerationStats' fields (batch 1) or their batch analogues."""
    run_config = replace(config, policy=point.policy, prefetch_depth=point.prefetch_depth,
                         gpu_budget="unbounded" if point.budget_bytes is None
                         else point.budget_bytes, cache_entries=None)
    with load(model, run_config) as engine:
        engine.generate(prompt, max_new_tokens=1, greedy=True)  # warm-up: kernels, lru fill
        if point.batch == 1:
            result = engine.generate(prompt, max_new_tokens=tokens, greedy=True)
            row = dict(result.stats.as_dict())
            row["token_ids"] = " ".join(map(str, result.token_ids))
        else:
            row = measure_batch(engine, prompt, point.batch, tokens)
    decode_s = row["seconds"] - row["time_to_first_token_s"]
    row["prefill_tokens_per_s"] = (row["prompt_tokens"] * point.batch
                                   / row["time_to_first_token_s"]
                                   if row["time_to_first_token_s"] > 0 else 0.0)
    row["h2d_gb_per_s"] = row["h2d_bytes"] / row["seconds"] / 1e9 if row["seconds"] else 0.0
    row["decode_seconds"] = decode_s
    return row


COMPILE_ROUNDS = 3  # alternating eager/compiled runs per point under bench --compile


def measure_compiled(model: Path, config: EngineConfig, point: BenchPoint, prompt: str,
                     tokens: int, rounds: int = COMPILE_ROUNDS,
                     inspect: Optional[Callable] = None) -> List[dict]:
    """Eager and --compile at one point (batch 1): both engines loaded in this process,
    warmed up (the compiled one compiles its decode step then, timed as warmup_s), then
    ``rounds`` runs each, alternating, so both see the same machine load. Each row holds
    the median run by decode tok/s and every run's tok/s, plus what ``inspect(engine)``
    returns (a dict; tools/compile_table.py counts ops and profiles there)."""
    if point.batch != 1:
        raise ConfigError("bench --compile measures batch 1 (the compiled step is "
                          "driven by generate); drop --batch-sizes")
    run_config = replace(config, policy=point.policy, prefetch_depth=point.prefetch_depth,
                         gpu_budget="unbounded" if point.budget_bytes is None
                         else point.budget_bytes, cache_entries=None)
    with load(model, replace(run_config, compile=False)) as eager, \
            load(model, replace(run_config, compile=True)) as compiled:
        engines = {False: eager, True: compiled}
        warmup = {}
        for compiled_step, engine in engines.items():  # same cache bucket as the runs below
            started = time.perf_counter()
            engine.generate(prompt, max_new_tokens=tokens, greedy=True)
            warmup[compiled_step] = time.perf_counter() - started
        runs: Dict[bool, list] = {False: [], True: []}
        for _ in range(rounds):
            for compiled_step, engine in engines.items():
                runs[compiled_step].append(engine.generate(prompt, max_new_tokens=tokens,
                                                           greedy=True))
        extra = {step: inspect(engine) if inspect else {} for step, engine in engines.items()}
    rows = []
    for compiled_step, results in runs.items():
        ordered = sorted(results, key=lambda r: r.stats.decode_tokens_per_s)
        median = ordered[len(ordered) // 2]
        row = dict(median.stats.as_dict())
        row.update(token_ids=" ".join(map(str, median.token_ids)), compile=compiled_step,
                   warmup_s=warmup[compiled_step],
                   runs_tokens_per_s=" ".join(f"{r.stats.decode_tokens_per_s:.3g}"
                                              for r in results), **extra[compiled_step])
        row["decode_seconds"] = row["seconds"] - row["time_to_first_token_s"]
        row["prefill_tokens_per_s"] = (row["prompt_tokens"] / row["time_to_first_token_s"]
                                       if row["time_to_first_token_s"] > 0 else 0.0)
        row["h2d_gb_per_s"] = (row["h2d_bytes"] / row["seconds"] / 1e9
                               if row["seconds"] else 0.0)
        rows.append(row)
    return rows


def measure_batch(engine, prompt: str, batch: int, tokens: int) -> dict:
    """``batch`` copies of the prompt decoded together; first-token time from a 1-token run."""
    ids = engine.tokenizer(prompt, return_tensors="pt")["input_ids"].to(engine.device)
    ids = ids.repeat(batch, 1)  # (B, T)

    def timed(new_tokens: int) -> float:
        _synchronize(engine.device)
        started = time.perf_counter()
        with torch.inference_mode():
            engine.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  do_sample=False, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, pad_token_id=0)
        _synchronize(engine.device)
        return time.perf_counter() - started

    first = timed(1)
    before = engine.cache.stats.as_dict()
    seconds = timed(tokens)
    after = engine.cache.stats.as_dict()
    passes = after["passes"] - before["passes"]
    h2d = after["h2d_bytes"] - before["h2d_bytes"]
    uses = (after["hits"] - before["hits"]) + (after["misses"] - before["misses"])
    decode = max(seconds - first, 1e-9)
    return {"prompt_tokens": ids.shape[1], "new_tokens": tokens * batch, "seconds": seconds,
            "time_to_first_token_s": first,
            "decode_tokens_per_s": batch * (tokens - 1) / decode if tokens > 1 else 0.0,
            "forward_passes": passes, "h2d_bytes": h2d,
            "h2d_bytes_per_token": h2d / passes / batch if passes else 0.0,
            "hit_rate": (after["hits"] - before["hits"]) / uses if uses else 0.0,
            "stall_seconds": after["stall_seconds"] - before["stall_seconds"],
            "peak_device_bytes": (torch.cuda.max_memory_allocated(engine.device)
                                  if engine.device.type == "cuda" else None),
            **expert_counters(before, after)}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device) -> Dict[str, str]:
    """What a result is worth nothing without: device, versions, commit."""
    from ..runtime.engine import device_name
    from ..version import __version__

    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = "not installed"
    name = device_name(device) if device.type == "cuda" else f"CPU ({cpu_name()})"
    return {"device": str(device), "device_name": name, "torch": torch.__version__,
            "triton": triton, "offload_engine": __version__, "commit": git_commit(),
            "threads": str(torch.get_num_threads())}


def git_commit() -> str:
    """The checkout's commit (with -dirty for local changes), or why there is none."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty",
                              "--abbrev=12"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (git not available)"
    return out.stdout.strip() if out.returncode == 0 else "unknown (not a git checkout)"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
