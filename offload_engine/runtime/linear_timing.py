"""Per-call cost of the cache-backed Linear against a plain nn.Linear, on tiny shapes.

At 50 tokens/s a 32B model makes ~22,000 linear calls per second, so microseconds per
call matter. Both modules multiply the same float32 weight; the difference is ours.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..planning.policy import plan_cache
from ..planning.sizes import held_nbytes
from ..quant.layout import QuantSpec
from ..quant.quantize import dequantize_weight, quantize_weight
from .cache import DeviceCache
from .linear import OffloadedLinear
from .store import HostStore

OVERHEAD_SHAPES = ((64, 64), (256, 256), (512, 512))  # (in, out): tiny, so overhead shows


def linear_overhead(calls: int, device: torch.device, dtype: torch.dtype,
                    repeats: int = 7) -> list:
    """Microseconds per call: OffloadedLinear (resident, dequantized) vs nn.Linear."""
    torch.manual_seed(0)
    results = []
    for in_features, out_features in OVERHEAD_SHAPES:
        weight = quantize_weight(torch.randn(out_features, in_features), QuantSpec("int4", 64))
        store = HostStore({"w": weight}, pinned=False)
        plan = plan_cache([("w", held_nbytes(weight, "dequantized", dtype), weight.nbytes)],
                          None)
        cache = DeviceCache(store, ["w"], plan, device, "dequantized", dtype, progress=False)
        offloaded = OffloadedLinear("w", in_features, out_features, has_bias=False)
        offloaded.attach(cache)
        plain = torch.nn.Linear(in_features, out_features, bias=False, device=device,
                                dtype=dtype)
        plain.weight.data = dequantize_weight(weight, dtype).to(device)
        x = torch.randn(1, in_features, device=device, dtype=dtype)
        try:
            with torch.inference_mode():
                assert torch.equal(offloaded(x), plain(x))  # the same matmul on the same data
                plain_us = _median_call_us(plain, x, calls, repeats)
                offloaded_us = _median_call_us(offloaded, x, calls, repeats)
        finally:
            cache.close()
        results.append({"in_features": in_features, "out_features": out_features,
                        "nn_linear_us": plain_us, "offloaded_linear_us": offloaded_us,
                        "overhead_us": offloaded_us - plain_us})
    return results


def _median_call_us(module, x, calls: int, repeats: int) -> float:
    for _ in range(min(calls, 100)):  # warm up
        module(x)
    timings = []
    for _ in range(repeats):
        _synchronize(x.device)
        started = time.perf_counter_ns()
        for _ in range(calls):
            module(x)
        _synchronize(x.device)
        timings.append((time.perf_counter_ns() - started) / calls / 1e3)
    return statistics.median(timings)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
