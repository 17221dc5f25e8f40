"""Naive dense reference of the fused LM-head loss: the ground truth of the tests (small shapes only)."""

from __future__ import annotations

import torch

__all__ = ["dense_target_logprobs"]


def dense_target_logprobs(
    hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor, rows_N: torch.Tensor
) -> torch.Tensor:
    """``lp [N]`` through dense logits (float32, float64 for float64 inputs); differentiable; 0 on rows not needed."""
    acc = torch.float64 if hidden_ND.dtype == torch.float64 else torch.float32
    logits = hidden_ND.to(acc) @ weight_VD.to(acc).t()
    lp = torch.log_softmax(logits, dim=-1).gather(-1, targets_N.long().clamp(0, weight_VD.shape[0] - 1).unsqueeze(-1))
    return lp.squeeze(-1) * rows_N.to(acc)
