"""Token-level divergences (KL, reverse KL, token TIDAL) fused with the student's LM head (pipeline B).

Legend: N candidate rows (aligned pairs or masked positions), D hidden, V student vocabulary, V' the
shared-vocabulary prefix (``shared_vocab_size``).

The pipeline-B terms need the student's whole distribution on each selected row, not only one target
log-prob, so they cannot ride on :mod:`tide_ds.losses.fused_head`. Here the student logits of a row tile
are computed from the hidden states (``h W[:V']^T``, float32), every requested divergence and its
gradient with respect to the logits are taken on the tile (:func:`tide_ds.losses.kl.tile_divergence`),
and the tile's logit gradient is pushed straight into ``dh`` and ``dW``; the tile is then dropped. So the
student side never holds ``[N, V']`` logits; only the teacher's row logits (a constant, computed under
``no_grad`` on the shared prefix only) are ``[N, V']``.

Several terms (``kl+taid``) share one sweep: the logits of a tile are computed once for all of them.
Every term is ``T^2 * sum_n w_n D_n / max(1, n_selected)`` (docs/method.md §6 step 5, docs/method.md §7.3), normalised by the
number of selected rows; the count stays a device tensor (no host synchronisation off the CPU). On the
CPU only the selected rows are computed (finding them is free there); elsewhere every candidate row is
computed and unselected rows get weight 0, keeping shapes static.

Like the fused head loss, the gradients are formed in forward and only rescaled in backward, so the LM
head weight is read in forward only (correct under ZeRO-3, where the weight is gathered for the forward).

Pipeline B no longer takes this path: the trainer hands the teacher's hidden rows and head to
:mod:`tide_ds.losses.token_divergence` (both log-softmaxes online over vocabulary tiles, Triton or PyTorch
tiles, no ``[N, V']`` on either side). This one stays for callers that already hold teacher logits, and
as the comparison of that op's tests and CPU memory benchmark. :func:`tile_divergence` (``kl.py``) is the
per-tile maths both this path and the dense losses share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tide_kernels.fused_head import auto_chunk_rows

from tide_ds.losses.calm import accumulation_dtype
from tide_ds.losses.kl import tile_divergence

__all__ = ["DivergenceTerm", "fused_head_divergence"]


@dataclass(frozen=True)
class DivergenceTerm:
    """One token-level term: its logging name, divergence kind (forward/reverse/tidal) and weight."""

    name: str
    kind: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("forward", "reverse", "tidal"):
            raise ValueError(f"divergence kind {self.kind!r} must be forward, reverse or tidal")


class _FusedHeadDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, teacher_NV, selected_N, lam_N, omega_N, terms, temperature, chunk):  # type: ignore[override]
        acc = accumulation_dtype(hidden_ND)
        vocab = teacher_NV.shape[1]
        weight = weight_VD[:vocab].to(acc)  # [V', D]
        sel = selected_N.to(acc)
        count = sel.sum().clamp_min(1.0)
        base = sel * (temperature * temperature) / count  # [N]: T^2 / n on selected rows, 0 elsewhere
        if hidden_ND.device.type == "cpu":
            rows = torch.nonzero(selected_N, as_tuple=True)[0]
            tiles = [rows[s : s + chunk] for s in range(0, rows.numel(), chunk)]
        else:
            tiles = [slice(s, s + chunk) for s in range(0, hidden_ND.shape[0], chunk)]
        values = torch.zeros(len(terms), dtype=acc, device=hidden_ND.device)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden_ND) if need_h else None
        grad_w = torch.zeros(weight_VD.shape, dtype=acc, device=weight_VD.device) if need_w else None
        for idx in tiles:
            h = hidden_ND[idx].to(acc)  # [n, D]
            zs = (h @ weight.t()) / temperature  # [n, V'] tempered student logits
            zt = teacher_NV[idx].to(acc) / temperature
            dlogits = torch.zeros_like(zs) if (need_h or need_w) else None
            for k, term in enumerate(terms):
                lam = lam_N[idx].to(acc) if term.kind == "tidal" else None
                div_n, ddiv = tile_divergence(zs, zt, lam, term.kind)
                coeff_n = base[idx]
                if term.kind == "tidal":
                    coeff_n = coeff_n * omega_N[idx].to(acc)
                values[k] += (coeff_n * div_n).sum()
                if dlogits is not None:
                    dlogits.addcmul_(ddiv, (term.weight * coeff_n / temperature)[:, None])
            if need_h:
                grad_h[idx] = (dlogits @ weight).to(grad_h.dtype)
            if need_w:
                grad_w[:vocab].addmm_(dlogits.t(), h)
        total = sum(term.weight * values[k] for k, term in enumerate(terms))
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight_VD.dtype
        ctx.mark_non_differentiable(values)
        return total, values

    @staticmethod
    def backward(ctx, grad_total, _grad_values):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_total.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_total.to(grad_w.dtype)).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None


def fused_head_divergence(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    teacher_NV: torch.Tensor,
    selected_N: torch.Tensor,
    terms: tuple[DivergenceTerm, ...],
    *,
    temperature: float,
    lam_N: torch.Tensor | None = None,
    omega_N: torch.Tensor | None = None,
    chunk_rows: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``sum_k weight_k * term_k`` of the student rows ``hidden_ND`` against teacher logits, without ``[N, V']``.

    Args:
        hidden_ND: student final hidden states of the candidate rows ``[N, D]`` (differentiable).
        weight_VD: student LM head weight ``[V, D]`` (tied embedding for tied students); its first V' rows
            are the shared vocabulary.
        teacher_NV: teacher logits of the same rows on the shared prefix ``[N, V']`` (a constant).
        selected_N: bool ``[N]``: rows that count (masked, or aligned-and-masked); n = their number.
        terms: the token-level terms (forward KL, reverse KL, TIDAL), summed with their weights.
        temperature: T (``distill.kl_temperature``); every term is scaled by T^2.
        lam_N: TIDAL's per-row lambda (the row's sample lambda_j); required with a TIDAL term.
        omega_N: TIDAL's per-row timestep weight; None means 1.
        chunk_rows: rows per tile; 0 picks one from V'.

    Returns:
        ``(weighted sum, {term name: unweighted detached value})``, float32 (float64 for float64 hidden).
    """
    if hidden_ND.dim() != 2 or weight_VD.dim() != 2 or hidden_ND.shape[1] != weight_VD.shape[1]:
        raise ValueError(
            f"expected hidden [N, D] and weight [V, D] with equal D, got {tuple(hidden_ND.shape)} and {tuple(weight_VD.shape)}"
        )
    n = hidden_ND.shape[0]
    if teacher_NV.dim() != 2 or teacher_NV.shape[0] != n or not 0 < teacher_NV.shape[1] <= weight_VD.shape[0]:
        raise ValueError(
            f"teacher logits {tuple(teacher_NV.shape)} must be [N, V'] with N = {n} and V' <= the student's "
            f"vocabulary {weight_VD.shape[0]} (the shared prefix, distill.shared_vocab_size)"
        )
    if selected_N.shape != (n,):
        raise ValueError(f"selected rows {tuple(selected_N.shape)} must be [N] = [{n}]")
    if not terms:
        raise ValueError("fused_head_divergence needs at least one term")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    if any(term.kind == "tidal" for term in terms):
        if lam_N is None:
            raise ValueError("a TIDAL term needs lam_N (the per-row lambda)")
        if omega_N is None:
            omega_N = torch.ones(n, dtype=torch.float32, device=hidden_ND.device)
    chunk = chunk_rows or auto_chunk_rows(teacher_NV.shape[1])
    total, values = _FusedHeadDivergence.apply(
        hidden_ND, weight_VD, teacher_NV, selected_N.bool(), lam_N, omega_N, tuple(terms), float(temperature), chunk
    )
    return total, {term.name: values[k] for k, term in enumerate(terms)}
