"""Prefilling the prompts admitted in one step together: one forward, one weight pass.

When the model does not fit the GPU budget, every forward streams the non-resident weights
host->device once, whatever it scores. Prompts prefilled one by one cost one pass each
before the first decode step, and every running row waits through all of them; left-padded
to the longest and run as one forward, they cost one pass.

Each row computes what it would alone: the attention mask hides the padding and its
position ids count only the row's own tokens (as ``BatchedCache.decode_inputs`` does for a
decode step). With ``logits_to_keep=1`` the one column kept is every row's last real token,
since left padding puts all real tokens at the right end. The padding columns of the cache
hold what the model computed at those positions (finite; attention over a fully masked row
gives zeros in torch >= 2.5 and transformers' additive masks); the mask hides them.

Padding costs compute and activation memory (rows x longest prompt), so one forward takes
at most ``--max-prefill-tokens`` padded tokens; the prompts behind wait for the next step.
"""

from __future__ import annotations

from typing import List

import torch

# What the padding positions feed the model; any id in the vocabulary does, as the mask
# hides those positions from every real token.
PAD_TOKEN_ID = 0


def group_size(prompt_lengths: List[int], max_tokens: int) -> int:
    """How many of the prompts, in queue order, one prefill forward takes.

    As many as keep rows x longest prompt within ``max_tokens``, and always the first, however
    long: a prompt over the cap runs alone rather than waiting forever.
    """
    longest = 0
    for count, length in enumerate(prompt_lengths):
        longest = max(longest, length)
        if count > 0 and (count + 1) * longest > max_tokens:
            return count
    return len(prompt_lengths)


def padded_inputs(prompts: List[List[int]], device: torch.device) -> dict:
    """Model kwargs for one forward over ``prompts``, left-padded to the longest."""
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), PAD_TOKEN_ID, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, T): 1 real, 0 padding
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, T): from each row's first token
    return dict(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                position_ids=positions.to(device), use_cache=True, logits_to_keep=1)
