"""Canvas layout for BD3LM sampling: left padding, logical positions, block-causal masks (docs/method.md §13.1 items 1-2).

The canvas ``[B, T]`` holds the left-padded prompts (width P, a multiple of the block size K) followed by
the generated region. Block ``j`` is canvas columns ``[jK, (j+1)K)``, so generation starts on a block
boundary. A query may attend to a key iff both are real tokens and ``block(key) <= block(query)``
(block-causal, bidirectional inside a block): the inference counterpart of the training mask, where the
noisy block sees the clean copy of the earlier blocks and itself.

Where we deviate from the reference: validity is an explicit ``[B, T]`` flag (False only on the left
padding), not ``token != pad_id``, so a generated pad token (``<|endoftext|>`` is Qwen3's pad) stays a
real token; and a padded query attends to itself, so its row is never empty (an empty row is NaN under
SDPA and the NaN would reach real rows through ``0 * NaN`` in the value product).

Legend: B batch, P prompt width, T canvas length, K block size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["block_causal_mask", "left_pad", "logical_positions"]


def left_pad(
    prompts: Sequence[Sequence[int]], *, block_size: int, pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token-id prompts to ``P = ceil(max_len / K) * K``.

    Returns:
        ``(ids [B, P] long, valid [B, P] bool)``; ``valid`` is False on the padding.
    """
    if block_size <= 0:
        raise ValueError(f"block_size={block_size} must be > 0")
    if not prompts:
        raise ValueError("no prompts given; pass at least one list of token ids")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError(f"prompt {lengths.index(0)} is empty; every prompt needs at least one token")
    width = -(-max(lengths) // block_size) * block_size
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
        valid[row, width - len(prompt):] = True
    return ids.to(device), valid.to(device)


def logical_positions(valid_BT: torch.Tensor) -> torch.Tensor:
    """RoPE positions: the number of real tokens up to and including a column, minus one; padding -> 0."""
    return (valid_BT.long().cumsum(-1) - 1).clamp_min(0)


def block_causal_mask(
    valid_BT: torch.Tensor, *, block_size: int, q_start: int, q_end: int, kv_end: int
) -> torch.Tensor:
    """Bool keep-mask ``[B, 1, q_end - q_start, kv_end]`` for queries ``[q_start, q_end)`` over keys ``[0, kv_end)``.

    ``True`` = may attend: both real and ``block(k) <= block(q)``, or ``q == k`` (a padded query sees itself).
    """
    device = valid_BT.device
    q = torch.arange(q_start, q_end, device=device)
    k = torch.arange(kv_end, device=device)
    causal_QK = (k[None, :] // block_size) <= (q[:, None] // block_size)
    keep_BQK = valid_BT[:, q_start:q_end, None] & valid_BT[:, None, :kv_end] & causal_QK
    keep_BQK = keep_BQK | (q[:, None] == k[None, :])
    return keep_BQK[:, None]
