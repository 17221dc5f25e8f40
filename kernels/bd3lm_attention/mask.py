"""The BD3LM block-diffusion attention mask as a predicate of indices (docs/method.md §2.3).

This is the one definition of the mask in the code base: the PyTorch reference of the attention op
builds its dense mask from it, and ``tide_ds.models.block_mask`` builds the SDPA, eager and
FlexAttention masks from it (kernels import only torch and triton, so the predicate lives here). The
Triton kernel evaluates the same three terms on index tiles (``kernel._allowed``); the interpreter tests
check that kernel against the reference on every layout.

The layout is ``2L`` tokens, two copies of length L; for an index ``r``: segment ``g = r >= L``, local
index ``r - L*g``, block ``beta = local // K``; ``c`` ("is clean copy") is ``g`` for order ``xt_x0``
(student) and ``not g`` for ``x0_xt`` (teacher option, ``clean_first``). ``(q, kv)`` may attend when any of

* block-diagonal:        ``beta(q) == beta(kv)`` and ``c(q) == c(kv)``
* offset block-causal:   ``beta(q) >  beta(kv)`` and ``c(kv)`` and not ``c(q)``
* block-causal:          ``beta(q) >= beta(kv)`` and ``c(kv)`` and ``c(q)``

Legend: L length of one copy, K block size.
"""

from __future__ import annotations

import torch

__all__ = ["bd3lm_allowed", "bd3lm_dense_mask"]


def bd3lm_allowed(
    q_idx: torch.Tensor, kv_idx: torch.Tensor, *, seq_len: int, block_size: int, clean_first: bool
) -> torch.Tensor:
    """Whether query ``q_idx`` may attend to key ``kv_idx`` in the 2L-token BD3LM layout.

    Args:
        q_idx, kv_idx: integer tensors of indices in ``[0, 2L)``, broadcastable against each other.
        seq_len: L, the length of one copy.
        block_size: K.
        clean_first: False for order ``xt_x0`` (student), True for ``x0_xt`` (teacher option).

    Returns:
        bool tensor of the broadcast shape. Pure tensor ops (no branching on values), so it also serves
        as a FlexAttention ``mask_mod``.
    """
    q_second = q_idx >= seq_len
    kv_second = kv_idx >= seq_len
    q_block = (q_idx - seq_len * q_second.long()) // block_size
    kv_block = (kv_idx - seq_len * kv_second.long()) // block_size
    # c(r) = g(r) for xt_x0, 1 - g(r) for x0_xt; clean_first is a Python constant, not a tensor value.
    q_clean = q_second ^ clean_first
    kv_clean = kv_second ^ clean_first
    block_diagonal = (q_block == kv_block) & (q_clean == kv_clean)
    offset_block_causal = (q_block > kv_block) & kv_clean & ~q_clean
    block_causal = (q_block >= kv_block) & kv_clean & q_clean
    return block_diagonal | offset_block_causal | block_causal


def bd3lm_dense_mask(
    seq_len: int, block_size: int, *, clean_first: bool = False, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The mask as a dense boolean tensor ``[1, 1, 2L, 2L]`` (True = may attend), built fresh on each call."""
    idx = torch.arange(2 * seq_len, device=device)
    return bd3lm_allowed(idx[:, None], idx[None, :], seq_len=seq_len, block_size=block_size, clean_first=clean_first)[
        None, None
    ]
