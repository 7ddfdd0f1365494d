"""/metrics in the Prometheus text exposition format (version 0.0.4), from Metrics.snapshot().

Written by hand: the format is a few lines of text, and the server needs no client library
for it. tests/test_server_metrics.py parses the output with prometheus_client's parser.
"""

from __future__ import annotations

from typing import Iterable, List, Tuple

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "offload_engine_"

# (name, type, help, key in the snapshot); counters end in _total as Prometheus expects
SERVER_METRICS: Tuple[Tuple[str, str, str, str], ...] = (
    ("tokens_generated_total", "counter", "Tokens generated for all requests.",
     "tokens_generated"),
    ("prefills_total", "counter", "Prompts prefilled.", "prefills"),
    ("prefill_passes_total", "counter",
     "Prefill forwards run; the prompts admitted in one step share one.", "prefill_passes"),
    ("decode_steps_total", "counter", "Batched decode forwards run.", "batches_run"),
    ("busy_seconds_total", "counter", "Seconds the scheduler spent in steps.", "busy_seconds"),
    ("queue_depth", "gauge", "Requests waiting for a batch slot.", "queue_depth"),
    ("active_sequences", "gauge", "Requests being decoded.", "active_sequences"),
    ("decode_tokens_per_second", "gauge",
     "Tokens generated per second of scheduler time, since start.", "tokens_per_s"),
    ("h2d_bytes_per_token", "gauge",
     "Weight bytes copied host to device per generated token, since start.",
     "h2d_bytes_per_token"),
    ("mean_batch_size", "gauge", "Mean rows per decode forward.", "mean_batch_size"),
    ("max_batch_size_seen", "gauge", "Most rows in one decode forward.", "max_batch_size_seen"),
    ("uptime_seconds", "gauge", "Seconds since the server started.", "uptime_seconds"),
)
CACHE_METRICS: Tuple[Tuple[str, str, str, str], ...] = (
    ("cache_hits_total", "counter", "Weight fetches served by the device cache.", "hits"),
    ("cache_misses_total", "counter", "Weight fetches that copied from host.", "misses"),
    ("h2d_bytes_total", "counter", "Weight bytes copied host to device.", "h2d_bytes"),
    ("stall_seconds_total", "counter", "Seconds compute waited for a weight copy.",
     "stall_seconds"),
    ("cache_hit_rate", "gauge", "Share of weight fetches served by the device cache.",
     "hit_rate"),
    ("resident_bytes", "gauge", "Weight bytes held resident on the device.", "resident_bytes"),
    ("streamed_bytes", "gauge", "Weight bytes streamed through the ring every pass.",
     "streamed_bytes"),
)
EXPERT_METRICS: Tuple[Tuple[str, str, str, str], ...] = (  # mixture-of-experts models only
    ("expert_hits_total", "counter", "Routed experts found on the device.", "expert_hits"),
    ("expert_misses_total", "counter", "Routed experts copied from host (experts fetched).",
     "expert_misses"),
    ("expert_h2d_bytes_total", "counter", "Expert bytes copied host to device.",
     "expert_h2d_bytes"),
    ("expert_tokens_total", "counter", "Tokens through the first experts layer.",
     "expert_tokens"),
    ("expert_hit_rate", "gauge", "Share of routed experts found on the device.",
     "expert_hit_rate"),
    ("expert_prefetches_total", "counter", "Experts copied ahead by the next-layer prefetch.",
     "expert_prefetches"),
    ("expert_prefetch_hits_total", "counter",
     "Expert fetches the next-layer prefetch had already made.", "expert_prefetch_hits"),
    ("expert_prefetch_accuracy", "gauge",
     "Share of guessed next-layer experts that the layer then used.",
     "expert_prefetch_accuracy"),
)
OUTCOMES = ("served", "cancelled", "failed", "rejected")


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _family(name: str, kind: str, help_text: str,
            samples: Iterable[Tuple[str, float]]) -> List[str]:
    lines = [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} {kind}"]
    lines += [f"{PREFIX}{name}{labels} {float(value)!r}" for labels, value in samples]
    return lines


def render(model_id: str, snapshot: dict) -> str:
    """The whole exposition: request outcomes, server counters, the engine's cache."""
    lines = _family("model_info", "gauge", "The served model (always 1).",
                    [(f'{{model="{_label(model_id)}"}}', 1)])
    lines += _family("requests_total", "counter", "Requests finished, by outcome.",
                     [(f'{{outcome="{o}"}}', snapshot[f"requests_{o}"]) for o in OUTCOMES])
    for name, kind, help_text, key in SERVER_METRICS:
        lines += _family(name, kind, help_text, [("", snapshot[key])])
    if snapshot.get("compiled"):  # serve --compile
        lines += _family("compile_warmup_seconds", "gauge",
                         "Seconds spent compiling the decode step (once per KV cache bucket).",
                         [("", snapshot["compile_warmup_seconds"])])
    cache = snapshot.get("cache", {})
    for name, kind, help_text, key in CACHE_METRICS + (
            EXPERT_METRICS if cache.get("expert_layers") else ()):
        if isinstance(cache.get(key), (int, float)):
            lines += _family(name, kind, help_text, [("", cache[key])])
    return "\n".join(lines) + "\n"
