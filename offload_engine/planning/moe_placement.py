"""Where a mixture-of-experts model's cold experts run: copied to the device, or computed
on the CPU from host RAM (``--placement experts-cpu``, llama.cpp's ``--n-cpu-moe``).

Per decode step the routers pick ``experts_per_step`` experts; at expert hit rate h the
share 1 - h is not on the device. Streaming copies those over the host link; the CPU
placement reads them where they lie, in host RAM, with the CPU kernel, and moves each
experts layer's hidden states across twice (in, out), whatever the number of cold
experts. So, per decode step (a PREDICTION, like the rest of the plan):

    stream:      cold experts x copied bytes of one / h2d bandwidth
    experts-cpu: cold experts x bytes the CPU reads of one / cpu bandwidth
                 + layers x 2 crossings

and the rest of the step (resident weights, KV cache, overhead) is the same for both.
In the runtime the device's expert slots then hold a fixed set of experts (nothing is
copied after load), so the hit rate to predict with is the same as streaming's:
``--expert-hit-rate``, else slots / experts.
"""

from __future__ import annotations

from typing import Optional

from ..errors import ConfigError
from ..kernels.cpu_int4 import prepacked_shapes
from ..model.model_shape import ModelShape
from .disk_plan import host_budget_bytes
from .moe_sizes import expert_sizes
from .placement import (
    CPU_ROWS_PER_PASS,
    CROSSING_S,
    CROSSINGS_PER_CPU_PART,
    EXPERTS_CPU,
    Placement,
)

MOE_REFUSED = ("cpu", "mlp-cpu")  # dense parts on the CPU: not run for MoE models
PLACE_PARTS = ("auto", "stream") + MOE_REFUSED  # the placements of a dense model


def cpu_expert_bytes(shape: ModelShape) -> int:
    """Bytes the CPU reads to compute one expert: the CPU kernel's prepacked form where
    the scheme has one (as runtime/boundary.py's HostWeights counts), else the packed."""
    total = 0
    for out_features, in_features in shape.experts.matrices:
        shapes = prepacked_shapes(shape.spec, out_features, in_features)
        if shapes:
            total += sum(_numel(s) * dtype.itemsize for s, dtype in shapes.values())
        else:
            total += shape.spec.nbytes(out_features, in_features)
    return total


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def check_moe_placement(mode: str, moe: bool, what: str) -> None:
    """The placements `run` refuses for a (non-)MoE model, refused by `plan` alike."""
    if moe and mode in MOE_REFUSED:
        raise ConfigError(f"{what} is a mixture-of-experts model: --placement {mode} does not "
                          "apply to it yet; drop the flag (--placement experts-cpu computes "
                          "the experts the device does not hold on the CPU)")
    if not moe and mode == EXPERTS_CPU:
        raise ConfigError(f"--placement experts-cpu is for mixture-of-experts models; {what} "
                          "has no experts: use cpu, mlp-cpu or stream")


def place_experts(shape: ModelShape, plan, request, parts: list) -> Placement:
    """stream or experts-cpu for a MoE model, with both step predictions; auto picks the
    faster. Refuses what `run` refuses (check_moe_placement)."""
    check_moe_placement(request.placement, shape.experts is not None, "this model")
    prediction, profile, mode = plan.prediction, request.profile, request.placement
    sizes = expert_sizes(shape, plan.settings["cache_format"], request.torch_dtype())
    cold = prediction.experts_per_step * (1 - prediction.expert_hit_rate)
    cpu_bytes = int(round(cold * cpu_expert_bytes(shape)))
    stream_s = prediction.step_s
    cpu_s: Optional[float] = None
    if profile.cpu_bandwidth:
        passes = -(-request.batch // CPU_ROWS_PER_PASS)
        crossings = len(sizes.layers) * CROSSINGS_PER_CPU_PART * CROSSING_S if cold else 0.0
        cpu_s = (stream_s - prediction.expert_stream_bytes_per_step / profile.h2d_bandwidth
                 + cpu_bytes / profile.cpu_bandwidth * passes + crossings)
    host_budget = host_budget_bytes(request.host_budget)
    on_disk = host_budget is not None and host_budget < plan.weights["total_copy"]
    if mode == EXPERTS_CPU and on_disk:  # as runtime/boundary.py's HostWeights refuses
        raise ConfigError("--placement experts-cpu computes cold experts from host RAM, but "
                          "--host-budget leaves weights on disk: raise --host-budget to "
                          f"{plan.weights['total_copy']} bytes or use --placement stream")
    if mode == EXPERTS_CPU:
        chosen, reason = EXPERTS_CPU, "--placement experts-cpu"
    elif mode == "stream":
        chosen, reason = "stream", "--placement stream"
    elif profile.device == "cpu":  # as the runtime decides
        chosen, reason = "stream", "the device is the CPU"
    elif not cold:
        chosen, reason = "stream", "every expert fits on the device"
    elif on_disk:
        chosen, reason = "stream", "--host-budget leaves weights on disk"
    elif cpu_s is None:
        chosen, reason = "stream", "no cpu_bandwidth_gb_s in the hardware profile"
    elif cpu_s < stream_s:
        chosen, reason = EXPERTS_CPU, "cold experts on the CPU predicted faster"
    else:
        chosen, reason = "stream", "streaming cold experts predicted faster"
    return Placement(mode, chosen, [], list(parts), stream_s, cpu_s, reason, cpu_bytes)
