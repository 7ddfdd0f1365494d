"""``serve --compile``: the batch decoded in fixed slots by a compiled step.

The eager batcher (server/kvbatch.py) changes the batch size and the cache's width at
every join and leave, which a compiled graph would see as a new shape each time. Here the
KV cache is a SlotKVCache (runtime/kv_slots.py) of ``--max-batch`` slots x a cache-length
bucket (powers of two from 256, runtime/kv_static.py's ``static_cache_tokens``). A request
joins by having its prefilled row (prefilled eagerly, server/prefill.py) copied into the
lowest free slot, and leaves by freeing its slot. A step runs the first N slots, N the
batch-size bucket (1, 2, 4, ... up to ``--max-batch``) that covers the highest slot in
use, on a view of the cache sharing its storage; empty slots among them are fed token 0
and their logits are dropped. Per-slot positions are a tensor the step reads, so joins
and leaves change nothing the graph is specialised on: it compiles once per (batch-size
bucket, cache-length bucket), and only for the buckets traffic reaches.

Why batch-size buckets and not always ``--max-batch`` slots: on this project's CPU, one
request at a time served through 4 padded slots ran at 0.42x eager's tokens/s (rows are
not free there: eager's own 4-row step takes about 2.8x its 1-row step; docs/serving.md),
so a lone request would pay for empty slots at every token, while a bucket costs one
compilation, once. The cache-length bucket grows (a bigger cache, the slots copied over)
when an admitted request needs more positions than it holds; it never shrinks.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Set, Tuple

import torch

from ..errors import ConfigError, ResourceError
from ..model.cache_arg import cache_name
from ..runtime import compile_step
from ..runtime.kv_slots import SUPPORTED_ATTENTION, SlotKVCache, attention_mask
from ..runtime.kv_static import static_cache_tokens
from ..units import format_bytes
from .kv_capacity import KVCapacity

logger = logging.getLogger(__name__)


def batch_bucket(rows: int, slots: int) -> int:
    """Slots a step runs for ``rows`` leading slots: the next power of two, at most all."""
    bucket = 1
    while bucket < rows:
        bucket *= 2
    return min(bucket, slots)


def graph_bound(slots: int, slot_tokens: Optional[int]) -> int:
    """The most graphs the step can compile: batch buckets x cache-length buckets up to
    ``slot_tokens`` (from 256 by doubling, the last cut to the cap; 16 without a cap)."""
    batches = len({batch_bucket(rows, slots) for rows in range(1, slots + 1)})
    if slot_tokens is None:
        return batches * 16
    lengths = {static_cache_tokens(1, slot_tokens)}
    while max(lengths) < slot_tokens:
        lengths.add(static_cache_tokens(max(lengths) + 1, slot_tokens))
    return batches * len(lengths)


class SlotCapacity(KVCapacity):
    """The --kv-budget check when the cache is ``slots`` fixed rows: a request fits when
    its prompt plus max_tokens fits one slot of a cache sized for all of them."""

    def __init__(self, layout, budget: Optional[int], slots: int, context: Optional[int]):
        super().__init__(layout, budget)
        self.slots = slots
        limits = [t for t in (context, None if budget is None else
                              layout.max_tokens(budget, slots)) if t is not None]
        self.slot_tokens = min(limits) if limits else None  # positions one slot may hold

    def fits(self, width: int, rows) -> bool:
        return self.slot_tokens is None or all(filled + adds <= self.slot_tokens
                                               for filled, adds in rows)

    def room(self, prompt_tokens: int) -> Optional[int]:
        return None if self.budget is None else self.slot_tokens - prompt_tokens

    def refusal(self, prompt_tokens: int, max_tokens: int) -> str:
        return (f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is more "
                f"than the {self.slot_tokens} tokens one slot holds: serve --compile keeps a "
                f"static KV cache of --max-batch {self.slots} slots within the --kv-budget of "
                f"{format_bytes(self.budget or 0)}; shorten the prompt or lower max_tokens "
                "(the server's operator may raise --kv-budget or lower --max-batch)")


class SlotBatch:
    """The rows being decoded, each in a slot of one SlotKVCache, stepped compiled."""

    def __init__(self, engine, slots: int, slot_tokens: Optional[int]):
        config = engine.model.config
        implementation = getattr(config, "_attn_implementation", "sdpa")
        if implementation not in SUPPORTED_ATTENTION:
            raise ConfigError(f"serve --compile builds its attention mask for "
                              f"{' or '.join(SUPPORTED_ATTENTION)}, not --attention "
                              f"{implementation}; pick one of those or drop --compile")
        self.engine, self.slots, self.implementation = engine, slots, implementation
        self.slot_tokens = slot_tokens  # the most positions a slot may hold (SlotCapacity)
        self.cache: Optional[SlotKVCache] = None  # allocated at the first join
        self.row_slots: List[int] = []  # slot of each row, in row order
        self.shapes: Set[Tuple[int, int]] = set()  # (slots, tokens) stepped: one graph each
        self._views: Dict[int, SlotKVCache] = {}  # the cache's first N slots, by N
        self.compile_seconds = 0.0  # spent compiling the step (warm-up), all buckets
        self._cache_name = cache_name(engine.model)  # outside the graph: inspect.signature
        self._dtype = engine.config.torch_dtype()
        mode = compile_step.compile_mode(engine.device, engine.cache.plan.streamed_bytes > 0)
        # dynamo stops compiling a function after recompile_limit (8) graphs and runs it
        # eagerly from then on: let it hold every bucket this server can reach
        limit = graph_bound(slots, slot_tokens)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        compile_step.configure_inductor()
        self._step = torch.compile(self._forward, fullgraph=True, dynamic=False,
                                   backend="inductor", mode=mode)

    @property
    def rows(self) -> int:
        return len(self.row_slots)

    @property
    def width(self) -> int:
        """Positions per slot (0 before the first join)."""
        return 0 if self.cache is None else self.cache.tokens

    def join_prefilled(self, cache, mask: torch.Tensor, rows: List[int],
                       needs: List[int]) -> None:
        """Copy ``rows`` of a prefilled cache (``mask`` (B, T) marks its left padding) into
        free slots; ``needs[i]``: positions rows[i] may reach (prompt plus max_tokens)."""
        free = [s for s in range(self.slots) if s not in self.row_slots]
        if len(rows) > len(free):
            raise ResourceError(f"{len(rows)} requests joining but {len(free)} of the "
                                f"--max-batch {self.slots} slots free")
        self._reserve(max(needs))  # free: lowest first, so rows stay in a small bucket
        lengths = mask.sum(dim=1).tolist()
        for row, slot in zip(rows, free, strict=False):
            self.cache.load(slot, cache, row, int(lengths[row]))
            self.row_slots.append(slot)

    def _reserve(self, needed: int) -> None:
        """A cache whose slots hold ``needed`` positions: the bucket, grown if need be."""
        if self.cache is not None and needed <= self.cache.tokens:
            return
        tokens = static_cache_tokens(needed, self.slot_tokens)
        if self.cache is None:
            self.cache = SlotKVCache(self.engine.kv_layout, self.slots, tokens, self._dtype,
                                     self.engine.device)
        else:
            self.cache = self.cache.grown(tokens)
        self._views = {}
        logger.info("serve --compile: KV cache of %d slots x %d tokens (%s)", self.slots,
                    tokens, format_bytes(self.cache.nbytes()))

    def keep(self, rows: List[int]) -> None:
        """Keep only ``rows`` (in that order); the others' slots are free again."""
        kept = [self.row_slots[i] for i in rows]
        for slot in set(self.row_slots) - set(kept):
            self.cache.positions[slot] = 0  # an empty slot writes at 0 until it is reused
        self.row_slots = kept

    def step(self, last_tokens: List[int], model=None) -> torch.Tensor:
        """One compiled forward over the first slots (the batch bucket covering every row),
        feeding ``last_tokens[i]`` to row i;
        returns the rows' next-token logits (rows, V). ``model``: the engine's, which the
        step was compiled over (the argument keeps BatchedCache.step's signature)."""
        bucket = batch_bucket(max(self.row_slots) + 1, self.slots)
        cache = self._views.get(bucket)
        if cache is None:
            cache = self._views[bucket] = self.cache.view(bucket)
        device = cache.positions.device
        slots = torch.tensor(self.row_slots, dtype=torch.long, device=device)  # (rows,)
        input_ids = torch.zeros((bucket, 1), dtype=torch.long, device=device)  # (S, 1)
        input_ids[slots, 0] = torch.tensor(last_tokens, dtype=torch.long, device=device)
        started = compile_step.compile_seconds()
        logits = self._step(input_ids, cache)  # (S, V)
        self.compile_seconds += compile_step.compile_seconds() - started
        self.engine.count_compiled_steps(1)  # the weights the graph holds as constants
        self.shapes.add((bucket, cache.tokens))
        active = torch.zeros(bucket, dtype=torch.long, device=device)
        active[slots] = 1
        cache.positions.add_(active)  # inactive slots stay at 0: they write there, harmlessly
        return logits.index_select(0, slots)

    def _forward(self, input_ids: torch.Tensor, cache: SlotKVCache) -> torch.Tensor:
        """The compiled step: every slot's next-token logits (S, V)."""
        model = self.engine.model
        mask = attention_mask(cache.positions, cache.tokens, self.implementation, self._dtype)
        output = model(input_ids=input_ids, attention_mask=mask,
                       position_ids=cache.positions[:, None], use_cache=True,
                       logits_to_keep=1, **{self._cache_name: cache})
        return output.logits[:, -1]
