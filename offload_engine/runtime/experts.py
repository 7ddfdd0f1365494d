"""The cache-backed replacement for a transformers experts module.

A transformers 5 experts module (``Qwen3MoeExperts``, ``MixtralExperts``, ...) is called
as ``experts(hidden_states, top_k_index, top_k_weights)`` by its MoE block after the
router has run; the router and any shared experts are ordinary modules and stay as
they are. :class:`OffloadedExperts` takes the same call, but holds no 3-D parameters:
for each expert the router selected for at least one token (once for a whole prefill
batch), it acquires that expert's quantized matrices from the expert cache, runs them
through the kernel gateway on the tokens routed to it, and releases them. Experts no
token selected are never fetched.
"""

from __future__ import annotations

import time
import types
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..model.experts import ExpertsInfo
from ..planning.expert_policy import fetch_order
from .linear import apply_weight
from .ranges import LINEAR, profiled

CPU = torch.device("cpu")

_TORCH_STATE = {"_parameters", "_buffers", "_modules", "training"}


class OffloadedExperts(nn.Module):
    """Runs the selected experts of one layer from the expert cache."""

    def __init__(self, info: ExpertsInfo, original: nn.Module):
        super().__init__()
        self.info = info
        self.module_name = info.module_name
        self.num_experts = info.num_experts
        # The original's settings (has_gate, act_fn, a gpt-oss gate's alpha/limit...) and
        # small submodules (the activation, a post-expert norm) are kept as they are.
        for key, value in vars(original).items():
            if key not in _TORCH_STATE and not key.startswith("_"):
                setattr(self, key, value)
        for name, child in original.named_children():
            self.add_module(name, child)
        for name, param in original.named_parameters(recurse=False):
            if param.dim() != 3:  # biases (gpt-oss): small dense tensors, loaded as usual
                self.register_parameter(name, nn.Parameter(
                    torch.empty(param.shape, dtype=param.dtype, device="meta"),
                    requires_grad=False))
        if not info.routed_call:  # Llama 4: SwiGLU on gate_up's two halves, no decorator
            self.has_gate = True
        gate = getattr(type(original), "_apply_gate", None) or _swiglu
        self._gate = types.MethodType(gate, self)
        self.counts_tokens = False  # set on the first experts layer: per-token statistics
        self.cache = None  # an ExpertCache, set by attach()
        self.host = None  # HostWeights of the cold experts (--placement experts-cpu)
        self._next = None  # (next experts layer's name, its router), set by link_next_layers

    def attach(self, cache, host=None) -> None:
        """``host``: with --placement experts-cpu, the host weights (runtime/boundary.py's
        HostWeights) of the experts the device does not hold, computed on the CPU."""
        self.cache = cache
        self.host = host

    def forward(self, hidden_states: torch.Tensor, top_k_index: Optional[torch.Tensor] = None,
                top_k_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        # hidden_states (T, hidden); top_k_index, top_k_weights (T, k)
        if not self.info.routed_call:
            return self._pre_routed(hidden_states)
        if self.cache is None:
            raise RuntimeError(f"{self.module_name}: no expert cache attached "
                               "(use offload_engine.load)")
        if self.counts_tokens:
            self.cache.count_tokens(hidden_states.shape[0])
        routed = [e for e in torch.unique(top_k_index).tolist()
                  if e < self.num_experts]  # larger: an expert-parallel sentinel, not ours
        on_device = self.cache.begin(self.module_name, routed)
        if self._next is not None and self.cache.prefetching:  # copied while this computes
            name, router = self._next
            self.cache.prefetch(name, guess_experts(router, hidden_states, top_k_index.shape[-1]))
        picks = {e: torch.where(top_k_index == e) for e in routed}  # (token_idx, slot_idx)
        cold = self._cold([e for e in routed if e not in on_device],
                          lambda e: hidden_states[picks[e][0]])
        results = {}
        with profiled(LINEAR):
            for expert in fetch_order(routed, on_device):
                token_idx, slot_idx = picks[expert]
                states = (cold[expert] if expert in cold
                          else self._expert(expert, hidden_states[token_idx]))  # (n, hidden)
                results[expert] = token_idx, states * top_k_weights[token_idx, slot_idx, None]
        output = torch.zeros_like(hidden_states)
        for expert in sorted(results):  # one summation order, whatever the cache held
            token_idx, states = results[expert]
            output.index_add_(0, token_idx, states.to(output.dtype))
        return output

    def _pre_routed(self, rows: torch.Tensor) -> torch.Tensor:
        """Llama 4's call: rows (experts * T, hidden), expert e's block scaled by its routing
        weight, all zero where e was not picked. A SwiGLU expert without biases maps a zero
        row to zero, so only the non-zero rows are computed and only their experts fetched."""
        if self.cache is None:
            raise RuntimeError(f"{self.module_name}: no expert cache attached "
                               "(use offload_engine.load)")
        blocks = rows.view(self.num_experts, -1, rows.shape[-1])  # (E, T, hidden)
        if self.counts_tokens:
            self.cache.count_tokens(blocks.shape[1])
        picked = blocks.abs().amax(dim=-1) != 0  # (E, T)
        routed = torch.nonzero(picked.any(dim=-1)).flatten().tolist()
        output = torch.zeros_like(blocks)
        on_device = self.cache.begin(self.module_name, routed)
        token_idx = {e: torch.nonzero(picked[e]).flatten() for e in routed}
        cold = self._cold([e for e in routed if e not in on_device],
                          lambda e: blocks[e, token_idx[e]])
        with profiled(LINEAR):
            for expert in fetch_order(routed, on_device):
                states = (cold[expert] if expert in cold
                          else self._expert(expert, blocks[expert, token_idx[expert]]))
                output[expert, token_idx[expert]] = states.to(output.dtype)
        return output.view(-1, rows.shape[-1])

    def _cold(self, experts: List[int], rows: Callable[[int], torch.Tensor]
              ) -> Dict[int, torch.Tensor]:
        """The outputs of ``experts`` (not on the device) computed on the CPU from host RAM:
        their input rows cross to the CPU in one transfer and their outputs back in one."""
        if not experts or self.host is None:  # streaming: the cache copies them instead
            return {}
        stats, home = self.host.stats, rows(experts[0]).device
        started = time.perf_counter()
        inputs = [rows(e) for e in experts]  # (n_e, hidden) each
        sizes = [x.shape[0] for x in inputs]
        with profiled(LINEAR):
            x = torch.cat(inputs).to(CPU)  # (sum n_e, hidden)
            outs = [self._compute(e, part, self._host_weights(e), CPU)
                    for e, part in zip(experts, x.split(sizes), strict=True)]
            out = torch.cat(outs).to(home)  # (sum n_e, hidden)
        stats.crossings += 2
        stats.cpu_part_calls += 1
        stats.cpu_seconds += time.perf_counter() - started
        return {e: self._post(part) for e, part in zip(experts, out.split(sizes), strict=True)}

    def _host_weights(self, expert: int) -> list:
        return [self.host.acquire(name).weight for name in self.info.expert_modules(expert)]

    def _expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        held = self.cache.acquire(self.module_name, expert)
        try:
            out = self._compute(expert, x, held, x.device)
        finally:
            self.cache.release(self.module_name, expert)
        return self._post(out)

    def _compute(self, expert: int, x: torch.Tensor, held, device: torch.device
                 ) -> torch.Tensor:
        """One expert's matrices on x (n, hidden), where ``held`` lives (``device``)."""
        up_bias = down_bias = None
        if self.info.has_bias:
            first = self.info.matrices[0].param
            up_bias = getattr(self, f"{first}_bias")[expert].to(device)
            down_bias = self.down_proj_bias[expert].to(device)
        hidden = apply_weight(x, held[0], up_bias)  # (n, 2 * inter) or (n, inter)
        hidden = self._gate(hidden) if self.has_gate else self.act_fn(hidden)
        return apply_weight(hidden, held[1], down_bias)  # (n, hidden)

    def _post(self, out: torch.Tensor) -> torch.Tensor:
        """What follows the matrices, on the device (a post-expert norm)."""
        if getattr(self, "has_post_expert_norm", False):
            out = self.post_expert_norm(out)
        return out

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, matrices="
                f"{[m.param for m in self.info.matrices]}, module={self.module_name!r}")


def link_next_layers(model: nn.Module, modules: Sequence[OffloadedExperts]) -> int:
    """Give each experts layer the next one's router, to guess that layer's experts from
    its own input (mixtral-offloading's speculative prefetch: the residual stream changes
    little from one layer to the next). Returns the number of layers linked; layers whose
    router is not found (or Llama 4's pre-routed call) are not."""
    linked = 0
    for current, following in zip(modules, modules[1:], strict=False):
        router = find_router(model, following)
        if router is not None and current.info.routed_call and following.info.routed_call:
            current._next = (following.module_name, router)
            linked += 1
    return linked


def find_router(model: nn.Module, experts: OffloadedExperts) -> Optional[nn.Module]:
    """The experts module's sibling holding a (num_experts, hidden) router weight."""
    parent_name = experts.module_name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    for child in parent.children():
        weight = getattr(child, "weight", None)
        if (child is not experts and isinstance(weight, torch.Tensor) and weight.dim() == 2
                and weight.shape[0] == experts.num_experts):
            return child
    return None


def guess_experts(router: nn.Module, hidden_states: torch.Tensor, top_k: int) -> List[int]:
    """The experts ``router`` would pick for ``hidden_states`` (T, hidden), best first:
    each token's top-k by routing probability, ranked by probability summed over tokens.
    A plain softmax top-k: routers with a score correction or group limit (DeepSeek-V3)
    pick a little differently, which only makes the guess worse, never the result."""
    with torch.no_grad():
        logits = F.linear(hidden_states.to(router.weight.dtype), router.weight,
                          getattr(router, "bias", None))  # (T, E)
        top = torch.topk(logits.float().softmax(dim=-1), min(top_k, logits.shape[-1]), dim=-1)
        score = torch.zeros(logits.shape[-1], dtype=torch.float32, device=logits.device)
        score.index_add_(0, top.indices.flatten(), top.values.flatten())  # (E,)
        picked = torch.nonzero(score > 0).flatten().tolist()
        values = score.tolist()
    return sorted(picked, key=lambda e: (-values[e], e))


def _swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
    """act(gate) * up on the two halves of gate_up's output (transformers' default gate)."""
    gate, up = gate_up.chunk(2, dim=-1)  # (n, inter) each
    return self.act_fn(gate) * up
