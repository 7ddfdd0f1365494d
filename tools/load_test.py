"""A bounded load test of the server: N concurrent streaming clients, a fixed request count.

Loads MODEL, serves it on a free loopback port (nothing leaves this machine), and for each
concurrency sends ``--requests`` chat requests through that many concurrent clients, each
streaming, then stops. Prints a markdown table: requests/s, generated tokens/s, p50/p99
latency and time to first token, prefill forwards and weight MiB copied host->device per
request (from /metrics/json before and after), errors. Example (the demo model on CPU):

    OMP_WAIT_POLICY=PASSIVE python tools/load_test.py \
        ~/.cache/offload-engine/smollm2-135m-instruct-int4-asym-g64 --device cpu

``--compare-compile`` serves the model twice, eager and ``--compile`` (serve --compile's
fixed slots, server/slot_batch.py), side by side; sends one request to each and checks
that both greedy replies are identical, then warms both up with one untimed run of every
concurrency (the compiled server compiles its step for each batch-size bucket the traffic
reaches: the warm-up seconds, from /metrics/json), then runs every concurrency on both,
alternating, ``--rounds`` times, so a busy machine slows both alike; prints the median
tokens/s of each with every run. A timed run during which the compiled server still
compiled a bucket the untimed round did not reach is marked ``*`` and left out of the
median.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import List

import httpx

from offload_engine.cli.options import add_engine_args, engine_config_from_args
from offload_engine.decode.api import load
from offload_engine.server.app import ServerConfig, create_app
from offload_engine.server.runner import BackgroundServer

QUESTIONS = ["What is 2 + 2?", "Name a planet.", "What color is the sky?",
             "Who wrote Hamlet?", "Give me one tip for clean code.", "What is a list?"]


@dataclass
class Run:
    concurrency: int
    wall_s: float = 0.0
    latencies: List[float] = field(default_factory=list)
    first_tokens: List[float] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0
    prefill_passes: int = 0  # prefill forwards the server ran for this concurrency
    h2d_bytes: int = 0  # weight bytes it copied host->device meanwhile
    compile_s: float = 0.0  # seconds the server spent compiling meanwhile (serve --compile)


def percentile(values: List[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))] if ordered else 0.0


async def one_request(client: httpx.AsyncClient, url: str, model: str, index: int,
                      max_tokens: int, run: Run) -> None:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}]}
    started, first, usage = time.perf_counter(), None, None
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as reply:
            if reply.status_code != 200:
                run.errors += 1
                return
            async for line in reply.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    run.errors += 1
                    return
                if chunk.get("usage"):
                    usage = chunk["usage"]
                elif first is None and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - started
    except httpx.HTTPError:
        run.errors += 1
        return
    run.latencies.append(time.perf_counter() - started)
    run.first_tokens.append(first if first is not None else run.latencies[-1])
    run.tokens += usage["completion_tokens"] if usage else 0


def server_counters(url: str) -> tuple:
    """(prefill forwards, weight bytes copied host->device, seconds spent compiling) the
    server has counted so far."""
    metrics = httpx.get(f"{url}/metrics/json", timeout=60).json()
    return (metrics["prefill_passes"], metrics["cache"].get("h2d_bytes", 0),
            metrics.get("compile_warmup_seconds") or 0.0)


def measured(url: str, model: str, concurrency: int, requests: int, max_tokens: int) -> Run:
    """One load run, with the server's counters for it (each run starts from an idle server)."""
    passes, h2d, compiling = server_counters(url)
    run = asyncio.run(load_at(url, model, concurrency, requests, max_tokens))
    passes_after, h2d_after, compiling_after = server_counters(url)
    run.prefill_passes, run.h2d_bytes = passes_after - passes, h2d_after - h2d
    run.compile_s = compiling_after - compiling
    return run


async def load_at(url: str, model: str, concurrency: int, requests: int,
                  max_tokens: int) -> Run:
    run, queue = Run(concurrency), asyncio.Queue()
    for index in range(requests):
        queue.put_nowait(index)

    async def client_loop(client):
        while not queue.empty():
            await one_request(client, url, model, queue.get_nowait(), max_tokens, run)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        run.wall_s = time.perf_counter() - started
    return run


def table(runs: List[Run], requests: int, max_tokens: int) -> str:
    lines = ["| concurrency | requests | requests/s | tokens/s | latency p50 / p99 (s) | "
             "first token p50 / p99 (s) | prefill passes | MiB host->device / request | "
             "errors |", "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        lines.append(
            f"| {run.concurrency} | {requests} x {max_tokens} tokens | "
            f"{len(run.latencies) / run.wall_s:.2f} | {run.tokens / run.wall_s:.1f} | "
            f"{percentile(run.latencies, .5):.2f} / {percentile(run.latencies, .99):.2f} | "
            f"{percentile(run.first_tokens, .5):.2f} / {percentile(run.first_tokens, .99):.2f} | "
            f"{run.prefill_passes} | {run.h2d_bytes / requests / 2**20:.1f} | {run.errors} |")
    return "\n".join(lines)


def warm_up(url: str, model: str, max_tokens: int) -> tuple:
    """(greedy reply to the first question, its wall seconds, the server's compile seconds)."""
    started = time.perf_counter()
    reply = httpx.post(f"{url}/v1/chat/completions", timeout=3600, json={
        "model": model, "max_tokens": max_tokens, "temperature": 0,
        "messages": [{"role": "user", "content": QUESTIONS[0]}]})
    reply.raise_for_status()
    seconds = time.perf_counter() - started
    warmup = httpx.get(f"{url}/metrics/json", timeout=60).json().get("compile_warmup_seconds")
    return reply.json()["choices"][0]["message"]["content"], seconds, warmup


def compare_compile(args, server_config: ServerConfig) -> int:
    """Eager and --compile servers side by side, measured alternately (see the module doc)."""
    config = engine_config_from_args(args)
    modes = {"eager": replace(config, compile=False), "compile": replace(config, compile=True)}
    runs = {mode: {n: [] for n in args.concurrency} for mode in modes}
    with contextlib.ExitStack() as stack:
        servers = {}
        for mode, mode_config in modes.items():
            app = create_app(stack.enter_context(load(args.model, mode_config)), server_config)
            servers[mode] = (stack.enter_context(BackgroundServer(app)).url,
                             app.state.service.model_id)
        warm = {mode: warm_up(*servers[mode], args.max_tokens) for mode in modes}
        for mode in modes:  # untimed: the compiled server compiles every batch bucket here
            for n in args.concurrency:
                measured(*servers[mode], n, args.requests, args.max_tokens)
        warmup_s = httpx.get(f"{servers['compile'][0]}/metrics/json",
                             timeout=60).json()["compile_warmup_seconds"]
        for _ in range(args.rounds):
            for n in args.concurrency:
                for mode in modes:
                    runs[mode][n].append(measured(*servers[mode], n, args.requests,
                                                  args.max_tokens))
    same = warm["eager"][0] == warm["compile"][0]
    print(f"greedy replies identical: {'yes' if same else 'NO'}; first request "
          f"{warm['eager'][1]:.1f} s eager, {warm['compile'][1]:.1f} s compiled (compiling "
          f"{warm['compile'][2]:.1f} s); compile warm-up over the untimed round "
          f"{warmup_s:.1f} s in all; {args.requests} requests x {args.max_tokens} tokens "
          f"per run, {args.rounds} rounds, alternating")
    print("| concurrency | eager tok/s (median; runs) | `--compile` tok/s (median; runs) | "
          "compiled / eager | errors |\n|---|---|---|---|---|")
    errors = 0
    for n in args.concurrency:
        rates = {mode: [run.tokens / run.wall_s for run in runs[mode][n] if not run.compile_s]
                 for mode in modes}
        medians = {mode: statistics.median(rates[mode] or [float("nan")]) for mode in modes}
        failed = sum(run.errors for mode in modes for run in runs[mode][n])
        errors += failed
        cells = [f"{medians[mode]:.1f} (" + " ".join(
            f"{run.tokens / run.wall_s:.1f}" + ("*" if run.compile_s else "")
            for run in runs[mode][n]) + ")" for mode in modes]
        print(f"| {n} | {cells[0]} | {cells[1]} | "
              f"{medians['compile'] / medians['eager']:.2f}x | {failed} |")
    return 1 if errors or not same else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a directory written by `offload-engine quantize`")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per reply")
    parser.add_argument("--max-prefill-tokens", type=int, default=ServerConfig.max_prefill_tokens,
                        metavar="N", help="the server's cap on one padded prefill forward "
                        "(default %(default)s; 1 prefills each prompt alone)")
    parser.add_argument("--compare-compile", action="store_true",
                        help="eager against --compile, side by side and alternating")
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs of each concurrency per mode under --compare-compile")
    add_engine_args(parser)
    args = parser.parse_args(argv)
    server_config = ServerConfig(max_batch=max(args.concurrency),
                                 max_queue=max(args.requests, 64),
                                 max_prefill_tokens=args.max_prefill_tokens)
    if args.compare_compile:
        return compare_compile(args, server_config)
    with load(args.model, engine_config_from_args(args)) as engine:
        app = create_app(engine, server_config)
        model = app.state.service.model_id
        with BackgroundServer(app) as server:  # loopback only
            runs = [measured(server.url, model, n, args.requests, args.max_tokens)
                    for n in args.concurrency]
    device = engine.stats.get("device_name", "?")
    print(f"model {model}, device {device}, greedy, {args.max_tokens} tokens per reply, "
          f"--max-prefill-tokens {args.max_prefill_tokens}")
    print(table(runs, args.requests, args.max_tokens))
    return 1 if any(run.errors for run in runs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
