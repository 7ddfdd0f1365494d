"""How many tokens the batched KV cache may hold under --kv-budget, in every --kv-cache mode.

The figures are the planner's (planning/kv_sizes.py ``KVLayout.cache_bytes``): stored bytes
per token x tokens x rows, plus one layer's dequantized scratch for the quantized modes.

Rows share one left-padded width, and every decode step adds one column while any row is
running, so the cache peaks at most at (width after the join) + (the most tokens any row
may still add) columns, times the rows. A request is admitted only if that peak fits the
budget; one that does not fit beside the running rows waits in the queue until rows leave,
and one that would not fit even alone is refused with the numbers. Each row is counted as
its prompt plus max_tokens, as ``generate`` counts one sequence.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

from ..errors import ContextLengthError
from ..planning.kv_sizes import KVLayout
from ..units import format_bytes


class KVCapacity:
    """The --kv-budget check for the server's batched cache (no-op without a budget)."""

    def __init__(self, layout: KVLayout, budget: Optional[int]):
        self.layout, self.budget = layout, budget

    def peak_bytes(self, width: int, rows: Iterable[Tuple[int, int]]) -> int:
        """Cache bytes at the peak for a batch of ``width`` columns now and ``rows``, each
        (columns it fills now, tokens it may still add)."""
        rows = list(rows)
        if not rows:
            return 0
        width = max([width] + [filled for filled, _ in rows])
        return self.layout.cache_bytes(width + max(adds for _, adds in rows), len(rows))

    def fits(self, width: int, rows: Iterable[Tuple[int, int]]) -> bool:
        return self.budget is None or self.peak_bytes(width, rows) <= self.budget

    def room(self, prompt_tokens: int) -> Optional[int]:
        """Tokens one request with this prompt may generate alone (None: no budget)."""
        if self.budget is None:
            return None
        return self.layout.max_tokens(self.budget, 1) - prompt_tokens

    def admit(self, width: int, running: List[Tuple[int, int]],
              waiting: List[Tuple[int, int]]) -> int:
        """How many of ``waiting`` (in queue order, none overtaking) may join the running
        rows now; rows are (columns filled, tokens still to add) as for ``peak_bytes``."""
        rows = list(running)
        for count, row in enumerate(waiting):
            rows.append(row)
            if not self.fits(width, rows):
                return count
        return len(waiting)

    def check_alone(self, prompt_tokens: int, max_tokens: int) -> None:
        """Refuse a request whose cache would not fit the budget even with no other row."""
        if self.fits(0, [(prompt_tokens, max_tokens)]):
            return
        raise ContextLengthError(self.refusal(prompt_tokens, max_tokens))

    def refusal(self, prompt_tokens: int, max_tokens: int) -> str:
        layout, tokens = self.layout, prompt_tokens + max_tokens
        scratch = " plus one layer's dequantized scratch" if layout.quantized else ""
        return (f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) needs "
                f"{format_bytes(layout.cache_bytes(tokens))} of KV cache (--kv-cache "
                f"{layout.mode}: {layout.token_bytes()} bytes per token{scratch}), over the "
                f"server's --kv-budget of {format_bytes(self.budget or 0)}, which holds "
                f"{layout.max_tokens(self.budget or 0, 1)} tokens for one request; shorten "
                "the prompt or lower max_tokens (the server's operator may raise --kv-budget "
                "or use a smaller --kv-cache)")
