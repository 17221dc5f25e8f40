"""Naive dense reference of the fused token divergences: the ground truth of the tests (small shapes only).

Full ``[N, V']`` logits of both models, ``log_softmax``, the three divergences of docs/method.md §6
and docs/method.md §7.3 written as their definitions, and ordinary autograd (TIDAL's target is detached).
"""

from __future__ import annotations

import torch

__all__ = ["dense_token_divergences"]


def dense_token_divergences(
    s_hidden_ND: torch.Tensor,
    s_weight_VD: torch.Tensor,
    t_hidden_NE: torch.Tensor,
    t_weight_VE: torch.Tensor,
    lam_N: torch.Tensor,
    *,
    temperature: float,
    vocab: int,
) -> torch.Tensor:
    """Per-row ``[N, 3]`` (forward KL, reverse KL, TIDAL) on the first ``vocab`` columns, differentiable in the
    student's rows and head; float64 throughout."""
    f64 = torch.float64
    a = (s_hidden_ND.to(f64) @ s_weight_VD[:vocab].to(f64).t()) / temperature
    b = (t_hidden_NE.to(f64) @ t_weight_VE[:vocab].to(f64).t()).detach() / temperature
    log_ps, log_pt = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    forward = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    reverse = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    lam = lam_N.to(f64)[:, None]
    log_r = torch.log_softmax((1 - lam) * a.detach() + lam * b, -1)
    tidal = (log_r.exp() * (log_r - log_ps)).sum(-1)
    return torch.stack((forward, reverse, tidal), dim=1)
