"""Plain-PyTorch references of the fused LM-head loss: the ground truth of the Triton kernels.

* :func:`fused_head_loss_reference` is :func:`tide_ds.losses.fused_head.fused_head_loss` (row tiles,
  gradients computed in the forward pass; float64 end to end for float64 inputs).
* :func:`dense_target_logprobs_reference` is the obvious dense computation (full ``[N, V]`` logits,
  ``log_softmax``, gather) with ordinary autograd, for tests on small shapes.

Legend: N rows, D hidden, V vocabulary.
"""

from __future__ import annotations

import torch

from tide_ds.losses.fused_head import LossFn, fused_head_loss

__all__ = ["LossFn", "dense_target_logprobs_reference", "fused_head_loss_reference"]


def fused_head_loss_reference(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_N: torch.Tensor,
    rows_N: torch.Tensor,
    loss_fn: LossFn,
    *,
    chunk_rows: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The plain-PyTorch tiled path, same contract as :func:`tide_kernels.fused_head.fused_head_loss_triton`."""
    return fused_head_loss(hidden_ND, weight_VD, targets_N, rows_N, loss_fn, chunk_rows=chunk_rows)


def dense_target_logprobs_reference(
    hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor, rows_N: torch.Tensor
) -> torch.Tensor:
    """``lp [N]`` through dense logits (float32, float64 for float64 inputs); differentiable; 0 on rows not needed."""
    acc = torch.float64 if hidden_ND.dtype == torch.float64 else torch.float32
    logits = hidden_ND.to(acc) @ weight_VD.to(acc).t()
    lp = torch.log_softmax(logits, dim=-1).gather(-1, targets_N.long().clamp(0, weight_VD.shape[0] - 1).unsqueeze(-1))
    return lp.squeeze(-1) * rows_N.to(acc)
