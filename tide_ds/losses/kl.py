"""Token-level divergences on the shared vocabulary prefix: forward KL, reverse KL (docs/method.md §6)
and the row engine that token-level TIDAL (docs/method.md §7.3, ``tide_ds.losses.tidal``) shares with them.

Legend: N selected rows (masked, or aligned-and-masked, positions), V_s / V_t student / teacher logit
width, V' the shared-vocabulary prefix (``shared_vocab_size``).

Every loss here is ``T^2 * sum_n w_n * D_n / max(1, N)`` over the N given rows, where D_n is a divergence
between tempered distributions on the first V' columns. Rows are processed ``chunk_rows`` at a time in
float32 (float64 for float64 inputs), and the gradient with respect to the student logits is computed in
the forward pass, tile by tile, so no ``[N, V']`` temporary outlives its tile (docs/method.md §15.19); backward
only rescales it. The teacher logits are a constant (the teacher runs under ``no_grad``): no gradient
flows to them. This plain-PyTorch path is the reference of the fused Triton kernels.
"""

from __future__ import annotations

from typing import Literal

import torch
from tide_kernels.fused_head import auto_chunk_rows

from tide_ds.losses.calm import accumulation_dtype

__all__ = ["row_divergence", "tile_divergence", "token_kl"]

Divergence = Literal["forward", "reverse", "tidal"]


def tile_divergence(
    zs: torch.Tensor, zt: torch.Tensor, lam: torch.Tensor | None, kind: Divergence
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row divergence D [n] and dD/da [n, V'] for tempered logits a = z^S / T (zs) and z^T / T (zt)."""
    log_ps = torch.log_softmax(zs, dim=-1)  # [n, V']
    ps = log_ps.exp()
    if kind == "forward":
        # KL(P_T || P_S); dD/da = P_S - P_T.
        log_pt = torch.log_softmax(zt, dim=-1)
        pt = log_pt.exp()
        return (pt * (log_pt - log_ps)).sum(-1), ps - pt
    if kind == "reverse":
        # KL(P_S || P_T); dD/da_v = P_S,v (log P_S,v - log P_T,v - D).
        diff = log_ps - torch.log_softmax(zt, dim=-1)
        div = (ps * diff).sum(-1)
        return div, ps * (diff - div[:, None])
    # TIDAL (docs/method.md §7.3): target r = softmax((1 - lam) a^S + lam a^T), detached; D = KL(r || P_S), dD/da = P_S - r.
    # log r comes from log_softmax, not log(max(r, 1e-8)): same gradient, exact value (D = 0 when r = P_S).
    log_r = torch.log_softmax((1 - lam)[:, None] * zs + lam[:, None] * zt, dim=-1)
    r = log_r.exp()
    return (r * (log_r - log_ps)).sum(-1), ps - r


class _RowDivergenceFunction(torch.autograd.Function):
    """``T^2 / max(1, N) * sum_n w_n D_n`` with dL/dz^S computed in forward, ``chunk_rows`` rows at a time."""

    @staticmethod
    def forward(ctx, student_NV, teacher_NV, lam_N, weight_N, kind, temperature, vocab, chunk_rows):  # type: ignore[override]
        acc = accumulation_dtype(student_NV)
        n_rows = student_NV.shape[0]
        scale = temperature * temperature / max(1, n_rows)
        loss = student_NV.new_zeros((), dtype=acc)
        need_grad = ctx.needs_input_grad[0]
        grad_NV = torch.zeros_like(student_NV) if need_grad else None
        for start in range(0, n_rows, chunk_rows):
            rows = slice(start, start + chunk_rows)
            zs = student_NV[rows, :vocab].to(acc) / temperature  # [n, V']
            zt = teacher_NV[rows, :vocab].to(acc) / temperature  # [n, V']
            lam = None if lam_N is None else lam_N[rows].to(acc)
            div_n, ddiv_nv = tile_divergence(zs, zt, lam, kind)
            coeff_n = torch.full_like(div_n, scale) if weight_N is None else scale * weight_N[rows].to(acc)
            loss += (coeff_n * div_n).sum()
            if need_grad:
                # d/dz = (1/T) d/da.
                grad_NV[rows, :vocab] = (ddiv_nv * (coeff_n / temperature)[:, None]).to(grad_NV.dtype)
        ctx.save_for_backward(grad_NV)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        (grad_NV,) = ctx.saved_tensors
        if grad_NV is not None:
            grad_NV = grad_NV * grad_loss.to(grad_NV.dtype)
        return grad_NV, None, None, None, None, None, None, None


def _shared_width(student_NV: torch.Tensor, teacher_NV: torch.Tensor, shared_vocab_size: int | None) -> int:
    if student_NV.dim() != 2 or teacher_NV.dim() != 2 or student_NV.shape[0] != teacher_NV.shape[0]:
        raise ValueError(
            f"expected student logits [N, V_s] and teacher logits [N, V_t] with the same N, got "
            f"{tuple(student_NV.shape)} and {tuple(teacher_NV.shape)}"
        )
    v_s, v_t = student_NV.shape[1], teacher_NV.shape[1]
    if shared_vocab_size is None:
        if v_s != v_t:
            raise ValueError(
                f"student and teacher logits have different widths ({v_s} vs {v_t}); set the shared "
                f"vocabulary size (distill.shared_vocab_size, 151646 for Qwen-family pairs)"
            )
        return v_s
    if not 0 < shared_vocab_size <= min(v_s, v_t):
        raise ValueError(
            f"distill.shared_vocab_size={shared_vocab_size} must be in [1, min(V_s, V_t)] = [1, {min(v_s, v_t)}]"
        )
    return shared_vocab_size


def row_divergence(
    student_NV: torch.Tensor,
    teacher_NV: torch.Tensor,
    *,
    kind: Divergence,
    temperature: float,
    shared_vocab_size: int | None,
    lam_N: torch.Tensor | None = None,
    weight_N: torch.Tensor | None = None,
    chunk_rows: int = 0,
) -> torch.Tensor:
    """Checked entry of the shared row engine; ``token_kl`` and ``tidal.token_tidal`` are its public faces."""
    vocab = _shared_width(student_NV, teacher_NV, shared_vocab_size)
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    for name, vec in (("lambda", lam_N), ("weight", weight_N)):
        if vec is not None and vec.shape != student_NV.shape[:1]:
            raise ValueError(f"{name} must have shape [N] = [{student_NV.shape[0]}], got {tuple(vec.shape)}")
    chunk = chunk_rows or auto_chunk_rows(vocab)
    return _RowDivergenceFunction.apply(
        student_NV, teacher_NV.detach(), lam_N, weight_N, kind, float(temperature), vocab, chunk
    )


def token_kl(
    student_logits_NV: torch.Tensor,
    teacher_logits_NV: torch.Tensor,
    *,
    temperature: float,
    shared_vocab_size: int | None = None,
    reverse: bool = False,
    chunk_rows: int = 0,
) -> torch.Tensor:
    """Forward or reverse KL at temperature T with T^2 scaling, mean over the given rows (docs/method.md §6).

    Both logit tensors are sliced to their first V' = ``shared_vocab_size`` columns (None: the widths
    must be equal), then ``P = softmax(z / T)`` and, per row,

    * forward (``reverse=False``, modes ``kl``/``kl_aligned``): ``KL(P_T || P_S)``;
    * reverse (``reverse=True``, ``reverse_kl``/``reverse_kl_aligned``): ``KL(P_S || P_T)``.

    Loss ``T^2 * sum_n KL_n / max(1, N)``; N = 0 gives 0. Gradient w.r.t. the student logits (forward):
    ``T (P_S - P_T) / N`` on the V' prefix, zero beyond it; none w.r.t. the teacher logits.

    Args:
        student_logits_NV: ``[N, V_s]`` student logits of the selected rows, any float dtype.
        teacher_logits_NV: ``[N, V_t]`` teacher logits of the same rows (treated as a constant).
        temperature: T (``kl_temperature``, 2.0).
        shared_vocab_size: V' (151646 for Qwen-family pairs).
        reverse: reverse instead of forward KL.
        chunk_rows: rows per tile; 0 picks a tile of about 256 MiB per ``[n, V']`` temporary.

    Returns:
        Scalar loss, float32 (float64 for float64 student logits).
    """
    return row_divergence(
        student_logits_NV,
        teacher_logits_NV,
        kind="reverse" if reverse else "forward",
        temperature=temperature,
        shared_vocab_size=shared_vocab_size,
        chunk_rows=chunk_rows,
    )
