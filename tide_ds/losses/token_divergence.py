"""Pipeline B's token terms from both models' hidden rows and heads: no ``[N, V']`` logits on either side.

Legend: N rows (aligned pairs or masked positions), V / V_t student / teacher vocabulary, V' the shared
prefix (``distill.shared_vocab_size``), D_s / D_t hidden sizes.

The terms are those of :mod:`tide_ds.losses.fused_divergence` (forward KL, reverse KL, token TIDAL, each
``T^2 sum_n w_n D_n / max(1, n_selected)`` with its weight, docs/method.md §6 step 5, docs/method.md §7.3), but the
teacher side arrives as its hidden rows and its head instead of float32 logits: both log-softmaxes come
from online log-sum-exp over vocabulary tiles (:mod:`tide_kernels.fused_divergence`). The teacher's head
is sliced to V' (a view), never copied or converted as a whole. Two implementations, chosen by
``model.loss_implementation`` as for the fused head losses (:func:`tide_ds.losses.fused_head.resolve_loss_implementation`):
the Triton kernels (``triton``; ``auto`` on CUDA) and the tiled PyTorch path (``pytorch``; ``auto``
elsewhere). The count of selected rows stays a device tensor (no host synchronisation off the CPU).
"""

from __future__ import annotations

import torch
from tide_kernels.fused_divergence import fused_token_divergence

from tide_ds.losses.fused_divergence import DivergenceTerm
from tide_ds.losses.fused_head import resolve_loss_implementation

__all__ = ["token_divergences"]

_COLUMN = {"forward": 0, "reverse": 1, "tidal": 2}


def token_divergences(
    s_hidden_ND: torch.Tensor,
    s_weight_VD: torch.Tensor,
    t_hidden_NE: torch.Tensor,
    t_weight_WE: torch.Tensor,
    selected_N: torch.Tensor,
    terms: tuple[DivergenceTerm, ...],
    *,
    temperature: float,
    shared_vocab_size: int | None = None,
    lam_N: torch.Tensor | None = None,
    omega_N: torch.Tensor | None = None,
    implementation: str = "auto",
    chunk_rows: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``sum_k weight_k * term_k`` of the student rows against the teacher rows, both through their heads.

    Args:
        s_hidden_ND: student final hidden states of the candidate rows ``[N, D_s]`` (differentiable).
        s_weight_VD: student LM head ``[V, D_s]`` (tied embedding for tied students).
        t_hidden_NE: teacher final hidden states of the same rows ``[N, D_t]`` (a constant).
        t_weight_WE: teacher LM head ``[V_t, D_t]`` (a constant; gathered by the caller under ZeRO-3).
        selected_N: bool ``[N]``: rows that count; n = their number.
        terms: the token-level terms, summed with their weights.
        temperature: T (``distill.kl_temperature``); every term is scaled by T^2.
        shared_vocab_size: V'; None: the two vocabularies must have the same size.
        lam_N: TIDAL's per-row lambda; required with a TIDAL term.
        omega_N: TIDAL's per-row weight; None means 1.
        implementation: ``model.loss_implementation`` (``auto``, ``pytorch`` = the PyTorch tiles, ``triton``).
        chunk_rows: rows per tile of the PyTorch path (0: automatic).

    Returns:
        ``(weighted sum, {term name: unweighted detached value})``, float32 (float64 for float64 rows).
    """
    n = s_hidden_ND.shape[0]
    if selected_N.shape != (n,):
        raise ValueError(f"selected rows {tuple(selected_N.shape)} must be [N] = [{n}]")
    if not terms:
        raise ValueError("token_divergences needs at least one term")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    v_s, v_t = s_weight_VD.shape[0], t_weight_WE.shape[0]
    if shared_vocab_size is None:
        if v_s != v_t:
            raise ValueError(
                f"student and teacher heads have different vocabularies ({v_s} vs {v_t}); set the shared "
                "vocabulary size (distill.shared_vocab_size, 151646 for Qwen-family pairs)"
            )
        shared_vocab_size = v_s
    has_tidal = any(term.kind == "tidal" for term in terms)
    if has_tidal and lam_N is None:
        raise ValueError("a TIDAL term needs lam_N (the per-row lambda)")
    acc = torch.float64 if s_hidden_ND.dtype == torch.float64 else torch.float32
    device = s_hidden_ND.device
    sel = selected_N.to(device=device, dtype=acc)
    base = sel * (temperature * temperature) / sel.sum().clamp_min(1.0)  # [N]: T^2 / n on selected rows, 0 elsewhere
    omega = base if omega_N is None else base * omega_N.to(device=device, dtype=acc)
    coeff = torch.zeros(n, 3, dtype=acc, device=device)
    for term in terms:
        k = _COLUMN[term.kind]
        coeff[:, k] += term.weight * (omega if term.kind == "tidal" else base)
    lam = lam_N.to(device=device, dtype=acc) if lam_N is not None else torch.zeros(n, dtype=acc, device=device)
    resolved = resolve_loss_implementation(implementation, device)
    total, div = fused_token_divergence(
        s_hidden_ND, s_weight_VD, t_hidden_NE, t_weight_WE, coeff, lam, vocab=shared_vocab_size,
        temperature=temperature, implementation=resolved, chunk_rows=chunk_rows,
    )
    values = {
        term.name: ((omega if term.kind == "tidal" else base) * div[:, _COLUMN[term.kind]]).sum() for term in terms
    }
    return total, values
