"""Text generation on an Engine: prompt handling, streaming, limits and measured stats."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Union

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..errors import ConfigError, ContextLengthError
from ..model.cache_arg import cache_kwargs
from ..runtime.cache import expert_counters
from ..runtime.kv_cache import check_kv_budget
from ..units import format_bytes
from . import speculate as spec
from .sampling import (
    SamplingSettings,
    TextTracker,
    hf_generate_args,
    logits_processors,
    model_defaults,
    resolve,
)


@dataclass
class GenerationStats:
    """What one generate call measured (timings after a device synchronize)."""

    prompt_tokens: int
    new_tokens: int
    seconds: float  # whole call, prefill included
    time_to_first_token_s: float
    decode_tokens_per_s: float  # tokens after the first / time after the first
    forward_passes: int
    h2d_bytes: int  # weight bytes copied host->device during the call
    h2d_bytes_per_token: float  # per forward pass (each reads every weight once); per
    # generated token: h2d_bytes_per_generated_token below
    hit_rate: float
    stall_seconds: float
    peak_device_bytes: Optional[int]  # CUDA only
    device: str
    device_name: str
    policy: str
    arena_bytes: int
    resident_bytes: int
    streamed_bytes: int
    disk_bytes: int = 0  # of h2d_bytes, those read from the shard files (--host-budget)
    disk_bytes_per_token: float = 0.0  # per forward pass, as h2d_bytes_per_token
    disk_read_bytes_per_s: float = 0.0  # the disk reader's achieved speed during the call
    disk_stall_seconds: float = 0.0  # the prefetch worker waiting for the disk reader
    # Speculative decoding (decode/speculate.py); tokens_per_pass is 1.0 without it.
    speculate: str = "off"  # "off", "lookup K=4 n=2", "draft K=4"
    tokens_per_pass: float = 0.0  # new tokens / target forward passes
    proposed_tokens: int = 0  # proposals the target verified
    accepted_tokens: int = 0  # proposals it kept
    acceptance_rate: float = 0.0  # accepted / proposed
    h2d_bytes_per_generated_token: float = 0.0  # h2d_bytes / new tokens
    draft_forward_passes: int = 0  # of the draft model (--speculate draft)
    kv_cache: str = "bf16"  # --kv-cache mode
    kv_cache_bytes: int = 0  # KV cache bytes held at the end (int8/int4: allocated + scratch)
    kv_read_bytes_per_pass: Optional[float] = None  # quantized KV bytes read per pass (int8/4)
    compiled: bool = False  # --compile: decode steps ran through torch.compile
    compile_seconds: float = 0.0  # of ``seconds``, spent compiling (warm-up; 0 once warm)
    # Layer parts computed on the CPU (--placement, runtime/boundary.py); per forward pass.
    placement: str = "stream"  # what ran: stream, or the --placement that put parts on the CPU
    cpu_bytes_per_token: float = 0.0  # weight bytes the CPU read
    cpu_seconds_per_token: float = 0.0  # wall time inside CPU-placed parts
    crossings_per_token: float = 0.0  # activation transfers between device and CPU
    # Mixture-of-experts models (None/0 for dense ones); per token through the experts layers
    expert_hit_rate: Optional[float] = None  # expert uses served by the device
    expert_bytes_per_token: float = 0.0  # expert bytes copied host->device
    experts_fetched_per_token: float = 0.0  # experts copied (summed over layers)
    experts_used_per_token: float = 0.0  # experts the routers picked (summed over layers)
    experts_cpu_per_token: float = 0.0  # computed on the CPU (--placement experts-cpu)
    experts_prefetched_per_token: float = 0.0  # of the fetched, copied ahead by the prefetch
    experts_prefetch_unused_per_token: float = 0.0  # copied ahead, never used (wrong guesses)
    expert_prefetch_accuracy: Optional[float] = None  # guessed next-layer experts then used

    def line(self) -> str:
        peak = ("n/a on CPU" if self.peak_device_bytes is None
                else format_bytes(self.peak_device_bytes))
        speculation = (f", {self.speculate}: acceptance {self.acceptance_rate:.0%}"
                       if self.speculate != "off" else "")
        return (f"[{self.new_tokens} tokens, {self.decode_tokens_per_s:.2f} tok/s, "
                f"first token {self.time_to_first_token_s:.2f} s, "
                f"{self.forward_passes} passes ({self.tokens_per_pass:.2f} tokens/pass"
                f"{speculation}), "
                f"{format_bytes(self.h2d_bytes_per_generated_token)}/token host->device, "
                f"hit rate {self.hit_rate:.1%}, peak device memory {peak}, "
                f"{self.device_name} ({self.device}), policy {self.policy}"
                + (f", {format_bytes(self.disk_bytes_per_token)}/token from disk at "
                   f"{self.disk_read_bytes_per_s / 1e9:.2f} GB/s, stall {self.stall_seconds:.2f} "
                   f"s (disk {self.disk_stall_seconds:.2f} s)" if self.disk_bytes else "")
                + ("" if self.kv_cache == "bf16" else f", KV cache {self.kv_cache} "
                   f"{format_bytes(self.kv_cache_bytes)}")
                + (f", compiled (warm-up {self.compile_seconds:.1f} s)" if self.compiled
                   else "")
                + ("" if self.expert_hit_rate is None else
                   f", experts: hit rate {self.expert_hit_rate:.1%}, "
                   f"{self.experts_fetched_per_token:.2f} of {self.experts_used_per_token:.2f}"
                   f" fetched/token, {format_bytes(self.expert_bytes_per_token)}/token"
                   + (f", {self.experts_cpu_per_token:.2f} on the CPU/token"
                      if self.experts_cpu_per_token else "")
                   + ("" if self.expert_prefetch_accuracy is None else
                      f", {self.experts_prefetched_per_token:.2f} prefetched/token "
                      f"({self.experts_prefetch_unused_per_token:.2f} more unused), guesses "
                      f"{self.expert_prefetch_accuracy:.1%} right")) + "]")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationResult:
    text: str
    token_ids: List[int]
    stats: GenerationStats


class _Streamer(BaseStreamer):
    """Hands final text to a callback as tokens arrive, cutting the reply at a stop string.

    transformers' generate calls ``put`` with the prompt first, then with each new token
    (several at once under speculation); ``end`` once. Text is handed out through the
    same TextTracker the server uses: held back while it could start a stop string."""

    def __init__(self, tokenizer, on_text: Optional[Callable[[str], None]], stops: List[str]):
        self.on_text = on_text
        self.tracker = TextTracker(tokenizer, stops)
        self.first_token_at: Optional[float] = None
        self.prompt_seen = False
        self.new_ids: List[int] = []
        self.stopped = threading.Event()  # a stop string appeared: generation should end

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if self.stopped.is_set():
            return
        self.new_ids.extend(value.reshape(-1).tolist())
        self._hand_out(final=False)

    def end(self):
        if not self.stopped.is_set():
            self._hand_out(final=True)

    def _hand_out(self, final: bool) -> None:
        text, stopped = self.tracker.update(self.new_ids, final)
        if stopped:
            self.stopped.set()
        if self.on_text is not None and text:
            self.on_text(text)


class _StopOnEvent(StoppingCriteria):
    def __init__(self, *events: threading.Event):
        self.events = events

    def __call__(self, input_ids, scores, **kwargs):
        stop = any(event.is_set() for event in self.events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def encode_prompt(engine, prompt: Optional[str], messages: Optional[list], chat: bool):
    tokenizer = engine.tokenizer
    if messages is None and chat:
        messages = [{"role": "user", "content": prompt or ""}]
    if messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"{engine.directory}: this model's tokenizer has no chat template; "
                              "run without --chat")
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
        return encoded["input_ids"]
    if prompt is None:
        raise ConfigError("give a prompt or chat messages")
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if input_ids.shape[-1] == 0:  # generate() would fail deep inside transformers instead
        raise ConfigError(f"the prompt {prompt!r} encodes to no tokens; give some text to "
                          "continue, or chat messages")
    return input_ids


def check_context(engine, prompt_tokens: int, max_new_tokens: int) -> None:
    limit = getattr(engine.model.config, "max_position_embeddings", None)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise ContextLengthError(
            f"the prompt ({prompt_tokens} tokens) plus --max-new-tokens {max_new_tokens} exceeds "
            f"the model's context of {limit} tokens; shorten the prompt or lower --max-new-tokens"
        )


def generate(engine, prompt: Optional[str] = None, *, messages: Optional[list] = None,
             chat: bool = False, max_new_tokens: int = 128, greedy: bool = False,
             seed: Optional[int] = None, stop: Union[str, List[str], None] = None,
             on_text: Optional[Callable[[str], None]] = None,
             stop_event: Optional[threading.Event] = None, speculate: Optional[str] = None,
             speculate_tokens: Optional[int] = None, **sampling) -> GenerationResult:
    """Generate a reply; ``on_text`` receives text as it is produced.

    ``sampling``: temperature, top_p, top_k, min_p, repetition_penalty, presence_penalty,
    frequency_penalty (decode/sampling.py); each one not given (or None) takes the model's
    generation_config.json value. ``greedy`` forces temperature 0. ``stop``: a string or
    list; the reply ends before the first one and does not contain it. ``speculate``
    ("off", "lookup", "draft") and ``speculate_tokens`` override the engine config's
    --speculate and --speculate-tokens for this call.
    """
    input_ids = _prompt_ids(engine, prompt, messages, chat, max_new_tokens)
    settings = _settings(engine, greedy, sampling)
    speculation = spec.resolve(engine, speculate, speculate_tokens)
    compile_config = engine.compile_config()  # None unless --compile
    past = engine.new_kv_cache(tokens=input_ids.shape[1] + max_new_tokens)  # None: dense
    past_kwargs = cache_kwargs(engine.model, past)
    if compile_config is not None:
        past_kwargs["compile_config"] = compile_config
    compile_started = _compile_seconds(compile_config)
    if seed is not None:
        torch.manual_seed(seed)
    streamer = _Streamer(engine.tokenizer, on_text, [stop] if isinstance(stop, str)
                         else list(stop or []))
    events = [streamer.stopped] + ([stop_event] if stop_event else [])
    before = engine.counters()
    draft_before = _draft_passes(engine)
    _reset_peak(engine.device)
    started = time.perf_counter()
    with torch.inference_mode(), spec.count_passes(engine.model, input_ids.shape[1]) as count:
        output = engine.model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens, streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_StopOnEvent(*events)]),
            logits_processor=logits_processors(settings, input_ids.shape[1]),
            pad_token_id=_pad_id(engine), **past_kwargs,
            **hf_generate_args(settings, engine.model.generation_config),
            **spec.generate_kwargs(engine, speculation))
    _synchronize(engine.device)
    finished = time.perf_counter()
    new_ids = output[0, input_ids.shape[1]:].tolist()
    if compile_config is not None:  # the pass hook skips compiled steps: one token each
        count.passes, count.scored_tokens = len(new_ids), input_ids.shape[1] + len(new_ids) - 1
        compile_seconds = _compile_seconds(compile_config) - compile_started
        engine.count_compiled_steps(len(new_ids) - 1)  # every token after the prefill's
    stats = _stats(engine, before, input_ids.shape[1], len(new_ids), started, finished,
                   streamer.first_token_at or finished)
    for name, value in spec.speculation_fields(speculation, count, len(new_ids), stats.h2d_bytes,
                                               _draft_passes(engine) - draft_before).items():
        setattr(stats, name, value)
    _add_kv_stats(stats, engine, past, output.shape[1] - 1)
    if compile_config is not None:  # a CUDA graph replays without the cache's Python
        stats.compiled, stats.compile_seconds = True, compile_seconds
        stats.forward_passes = count.passes
    return GenerationResult(streamer.tracker.emitted, new_ids, stats)


def _prompt_ids(engine, prompt, messages, chat: bool, max_new_tokens: int) -> torch.Tensor:
    """The prompt's token ids (1, T) on the device; refused before any work if the reply
    cannot fit the context or the KV budget."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    input_ids = encode_prompt(engine, prompt, messages, chat).to(engine.device)
    check_context(engine, input_ids.shape[1], max_new_tokens)
    check_kv_budget(engine.kv_layout, input_ids.shape[1] + max_new_tokens, 1,
                    engine.config.kv_budget_bytes())
    return input_ids


def _settings(engine, greedy: bool, sampling: dict) -> SamplingSettings:
    unknown = set(sampling) - set(SamplingSettings.__dataclass_fields__)
    if unknown:
        raise TypeError(f"generate() got unexpected keyword argument(s) {sorted(unknown)}")
    return resolve(model_defaults(engine.model.generation_config), greedy=greedy, **sampling)


def _compile_seconds(compile_config) -> float:
    if compile_config is None:  # keeps torch._dynamo unimported without --compile
        return 0.0
    from ..runtime.compile_step import compile_seconds

    return compile_seconds()


def _pad_id(engine):
    tokenizer = engine.tokenizer
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return engine.model.generation_config.eos_token_id


def _draft_passes(engine) -> int:
    draft = getattr(engine, "draft", None)
    return draft.cache.stats.passes if draft is not None else 0


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stats(engine, before: dict, prompt_tokens: int, new_tokens: int, started: float,
           finished: float, first_at: float) -> GenerationStats:
    after = engine.counters()
    passes = after["passes"] - before["passes"]
    h2d = after["h2d_bytes"] - before["h2d_bytes"]
    hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
    decode_seconds = finished - first_at
    summary = engine.stats
    return GenerationStats(
        prompt_tokens=prompt_tokens, new_tokens=new_tokens, seconds=finished - started,
        time_to_first_token_s=first_at - started,
        decode_tokens_per_s=((new_tokens - 1) / decode_seconds
                             if new_tokens > 1 and decode_seconds > 0 else 0.0),
        forward_passes=passes, h2d_bytes=h2d, h2d_bytes_per_token=h2d / passes if passes else 0.0,
        hit_rate=hits / (hits + misses) if hits + misses else 0.0,
        stall_seconds=after["stall_seconds"] - before["stall_seconds"],
        peak_device_bytes=(torch.cuda.max_memory_allocated(engine.device)
                           if engine.device.type == "cuda" else None),
        device=str(engine.device), device_name=summary["device_name"], policy=summary["policy"],
        arena_bytes=summary["arena_bytes"], resident_bytes=summary["resident_bytes"],
        streamed_bytes=summary["streamed_bytes"], **_disk_stats(before, after, passes),
        **_cpu_stats(summary, before, after, passes),
        **expert_counters(before, after),
    )


def _cpu_stats(summary: dict, before: dict, after: dict, passes: int) -> dict:
    """The CPU side of a placement, per forward pass."""
    if summary.get("placement_chosen", "stream") == "stream":
        return {}
    per = max(passes, 1)

    def delta(key: str) -> float:
        return (after[f"boundary_{key}"] - before[f"boundary_{key}"]) / per

    return dict(placement=summary["placement"], cpu_bytes_per_token=delta("cpu_bytes"),
                cpu_seconds_per_token=delta("cpu_seconds"),
                crossings_per_token=delta("crossings"))


def _disk_stats(before: dict, after: dict, passes: int) -> dict:
    if "disk_bytes_read" not in after:  # no disk tier
        return {}
    read = after["disk_bytes_read"] - before["disk_bytes_read"]
    seconds = after["disk_read_seconds"] - before["disk_read_seconds"]
    disk = after["disk_bytes"] - before["disk_bytes"]
    return dict(disk_bytes=disk, disk_bytes_per_token=disk / passes if passes else 0.0,
                disk_read_bytes_per_s=read / seconds if seconds > 0 else 0.0,
                disk_stall_seconds=after["disk_stall_seconds"] - before["disk_stall_seconds"])
def _add_kv_stats(stats: GenerationStats, engine, past, cached_tokens: int) -> None:
    """KV cache bytes: counted by the quantized cache; the dense one holds every token."""
    stats.kv_cache = engine.kv_layout.mode
    if past is None:  # the last token generated is never fed back, so never cached
        stats.kv_cache_bytes = engine.kv_layout.token_bytes() * cached_tokens
        return
    if engine.config.compile:  # static: the whole bucket is held and read every pass
        from ..runtime.kv_static import static_cache_bytes

        stats.kv_cache_bytes = static_cache_bytes(engine.kv_layout, past, 1)
        if engine.kv_layout.quantized:
            stats.kv_read_bytes_per_pass = (engine.kv_layout.token_bytes()
                                            * past.layers[0].max_cache_len)
        return
    stats.kv_cache_bytes = past.nbytes
    passes = max(1, past.counters.updates // engine.kv_layout.num_layers)
    stats.kv_read_bytes_per_pass = past.counters.read_bytes / passes
