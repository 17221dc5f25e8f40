"""Masked diffusion attention in plain PyTorch: the ground truth for the Triton kernel.

Two masks (one of them per call):

* BD3LM (docs/method.md §2.3): ``T = 2L`` tokens ``[x_t ; x_0]`` (or ``[x_0 ; x_t]`` with
  ``clean_first``), the boolean mask of :func:`tide_kernels.bd3lm_attention.mask.bd3lm_allowed`.
* Key lengths (padded bidirectional attention, the teacher of docs/method.md §3.1): sequence ``b`` holds
  ``key_lens[b]`` real tokens, then padding. Query ``i`` may attend to key ``j`` iff both
  ``i, j < key_lens[b]``; a query with no key (a padding row) returns 0 and passes no gradient,
  which is what SDPA gives for TIDE's ``-inf`` padding rows (docs/models.md §2.4), never NaN.

Dtype-generic: scores and softmax run in ``float32`` for 16-bit inputs and in ``float64`` for float64
inputs; the output has the input dtype. GQA repeats each K/V head over its group of query heads.

Legend: B batch, H query heads, H_kv key/value heads, T tokens (2L in BD3LM mode), Dh head dim.
"""

from __future__ import annotations

import torch
from tide_kernels.bd3lm_attention.mask import bd3lm_dense_mask

__all__ = ["bd3lm_attention_reference", "reference_mask"]


def reference_mask(
    *,
    num_tokens: int,
    seq_len: int | None,
    block_size: int | None,
    clean_first: bool,
    key_lens: torch.Tensor | None,
    device: torch.device | str,
) -> torch.Tensor:
    """The boolean mask (True = may attend): ``[1, 1, 2L, 2L]`` (BD3LM) or ``[B, 1, T, T]`` (key lengths)."""
    if key_lens is None:
        return bd3lm_dense_mask(seq_len, block_size, clean_first=clean_first, device=device)
    valid_BT = torch.arange(num_tokens, device=device)[None, :] < key_lens.to(device)[:, None]
    return (valid_BT[:, :, None] & valid_BT[:, None, :])[:, None]


def bd3lm_attention_reference(
    q_BHTD: torch.Tensor,
    k_BHTD: torch.Tensor,
    v_BHTD: torch.Tensor,
    *,
    seq_len: int | None = None,
    block_size: int | None = None,
    clean_first: bool = False,
    key_lens: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` per head; q ``[B, H, T, Dh]``, k/v ``[B, H_kv, T, Dh]`` -> ``[B, H, T, Dh]``.

    Pass ``seq_len`` and ``block_size`` for the BD3LM mask, or ``key_lens [B]`` (integer) for key
    lengths. ``scale`` defaults to ``Dh ** -0.5``. No argument checks: :func:`bd3lm_attention` does them.
    """
    num_heads, num_kv_heads, num_tokens, head_dim = q_BHTD.shape[1], k_BHTD.shape[1], q_BHTD.shape[2], q_BHTD.shape[3]
    scale = head_dim**-0.5 if scale is None else scale
    compute_dtype = torch.float64 if q_BHTD.dtype == torch.float64 else torch.float32
    group = num_heads // num_kv_heads
    q = q_BHTD.to(compute_dtype)
    k = k_BHTD.to(compute_dtype).repeat_interleave(group, dim=1)
    v = v_BHTD.to(compute_dtype).repeat_interleave(group, dim=1)
    allowed = reference_mask(
        num_tokens=num_tokens,
        seq_len=seq_len,
        block_size=block_size,
        clean_first=clean_first,
        key_lens=key_lens,
        device=q.device,
    )
    scores_BHTT = torch.where(allowed, (q @ k.transpose(-1, -2)) * scale, float("-inf"))
    # Subtracting a detached row max keeps exp finite; a row with no key (max -inf) uses 0 instead and
    # ends with a zero denominator, which we replace by 1 so that the row (and its gradient) is 0.
    row_max = scores_BHTT.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    probs = torch.exp(scores_BHTT - row_max)
    denom = probs.sum(dim=-1, keepdim=True)
    probs = probs / torch.where(denom > 0, denom, torch.ones_like(denom))
    return (probs @ v).to(q_BHTD.dtype)
