"""What the teacher returns: only what the losses need (docs/method.md §15 items 17, 18, 20).

* ``target_logprobs``: ``log p_T(x_0[i])`` per teacher position, float32 ``[B, L_t]``, for the CALM family;
  the LM head runs only on the requested rows (CPU) or tile by tile over the rows (accelerators, no
  host synchronisation), never producing ``[B, L_t, V_t]``.
* ``row_logits``: float32 logits ``[B, N, V']`` at given row indices, restricted to the shared vocabulary
  prefix inside the matmul, for KL / TIDAL (kept for tests and tools; pipeline B no longer uses it).
* ``row_hidden``: the final hidden states ``[B, N, D_t]`` at given row indices, in the teacher's dtype: what
  pipeline B hands to the fused token divergences (:mod:`tide_ds.losses.token_divergence`) together with
  the teacher's head, so that no ``[B, N, V']`` logits exist.

CompDemo (docs/method.md §8): complementary splits at token and chunk level, two passes, merge. When CompDemo is on,
every rank always runs both passes, whatever its data (docs/design.md decision 2).

Legend: B batch, L_t teacher length, N rows, D hidden, V_t teacher vocabulary, C chunks.
"""

from __future__ import annotations

import torch

from tide_ds.losses.fused_head import target_logprobs as fused_target_logprobs


@torch.no_grad()
def target_logprobs(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_N: torch.Tensor,
    rows_N: torch.Tensor,
    *,
    chunk_rows: int = 0,
    implementation: str = "pytorch",
) -> torch.Tensor:
    """``log softmax(h W^T)[target]`` in float32 for rows where ``rows_N``; 0 elsewhere. ``[N]``.

    ``implementation`` (``model.loss_implementation``): the row-tiled PyTorch path or the Triton kernel
    (:func:`tide_ds.losses.fused_head.target_logprobs`).
    """
    lp = fused_target_logprobs(hidden_ND, weight_VD, targets_N, rows_N, chunk_rows=chunk_rows, implementation=implementation)
    return lp.float()


@torch.no_grad()
def row_logits(
    hidden_BLD: torch.Tensor, weight_VD: torch.Tensor, rows_BN: torch.Tensor, *, vocab_limit: int | None = None
) -> torch.Tensor:
    """Float32 logits at positions ``rows_BN`` (clamped into range), over the first ``vocab_limit`` entries."""
    b, length, d = hidden_BLD.shape
    idx = rows_BN.long().clamp(0, length - 1)
    picked = hidden_BLD.gather(1, idx.unsqueeze(-1).expand(b, idx.shape[1], d))  # [B, N, D]
    weight = weight_VD if vocab_limit is None else weight_VD[:vocab_limit]
    return picked.float() @ weight.float().t()


@torch.no_grad()
def row_hidden(hidden_BLD: torch.Tensor, rows_BN: torch.Tensor) -> torch.Tensor:
    """Hidden states ``[B, N, D]`` at positions ``rows_BN`` (clamped into range), in the hidden states' dtype."""
    b, length, d = hidden_BLD.shape
    idx = rows_BN.long().clamp(0, length - 1)
    return hidden_BLD.gather(1, idx.unsqueeze(-1).expand(b, idx.shape[1], d))


def complementary_split(
    masked_BX: torch.Tensor, *, demo_ratio: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split masked items (tokens ``[B, L]`` or chunks ``[B, C]``) into disjoint ``(A, B)`` with ``A ∪ B = masked``.

    ``A`` holds each masked item with probability ``demo_ratio`` (docs/method.md §8.1 step 1, docs/method.md §8.2); one uniform per
    item from ``generator``, so the split is deterministic given it.
    """
    if not 0.0 < demo_ratio < 1.0:
        raise ValueError(f"distill.demo_ratio={demo_ratio!r} must lie in (0, 1)")
    u = torch.rand(masked_BX.shape, generator=generator, device=generator.device).to(masked_BX.device)
    in_a = u < demo_ratio
    return masked_BX & in_a, masked_BX & ~in_a


def chunks_to_tokens(chunk_flags_BC: torch.Tensor, chunk_ids_BL: torch.Tensor) -> torch.Tensor:
    """Token mask ``[B, L]``: token ``i`` is set iff its chunk (id >= 0) is set in ``chunk_flags_BC``."""
    valid = chunk_ids_BL >= 0
    idx = chunk_ids_BL.long().clamp_min(0)
    return chunk_flags_BC.gather(1, idx) & valid


def merge_passes(first_BX: torch.Tensor, second_BX: torch.Tensor, second_rows_BL: torch.Tensor) -> torch.Tensor:
    """Pass 1 everywhere, overwritten by pass 2 on the rows masked in pass 2 (docs/method.md §8.1 step 4)."""
    mask = second_rows_BL
    while mask.dim() < first_BX.dim():
        mask = mask.unsqueeze(-1)
    return torch.where(mask, second_BX, first_BX)
