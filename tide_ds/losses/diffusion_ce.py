"""Masked-diffusion cross-entropy (docs/method.md §1.4), fused with the LM head.

Legend: N flattened rows (the x_t half of the batch, B * L), D hidden, V vocabulary.

The loss is ``sum_n c_n * (logsumexp(h_n W^T) - (h_n W^T)[y_n])`` where ``c`` already holds the ELBO
weight, the mask and the normalisation (``tide_ds.diffusion.masking.token_loss_weights``). Because
``c`` is known in the forward pass, the gradients are computed there, one row chunk at a time, so no
``[N, V]`` tensor ever exists (docs/design.md decision 3); backward only rescales them by the upstream
gradient. This plain-PyTorch path is also the reference of the Triton kernel of the fused loss.
"""

from __future__ import annotations

import torch
from tide_kernels.common import accumulate_head_grads, scaled_forward_grads
from tide_kernels.fused_head import auto_chunk_rows


def masked_diffusion_ce_reference(
    logits_NV: torch.Tensor, targets_N: torch.Tensor, coeff_N: torch.Tensor
) -> torch.Tensor:
    """The spec in one line: ``sum(c * CE)`` from full logits (tests and small shapes only)."""
    logp = torch.log_softmax(logits_NV.double() if logits_NV.dtype == torch.float64 else logits_NV.float(), dim=-1)
    nll = -logp.gather(-1, targets_N.long().unsqueeze(-1)).squeeze(-1)
    return (coeff_N.to(nll.dtype) * nll).sum()


class FusedLinearCEFunction(torch.autograd.Function):
    """``sum(c * CE(h W^T, y))`` with gradients computed in forward, chunk by chunk over rows."""

    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, targets_N, coeff_N, chunk_rows):  # type: ignore[override]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc_dtype = torch.float64 if hidden_ND.dtype == torch.float64 else torch.float32
        loss = hidden_ND.new_zeros((), dtype=acc_dtype)
        nll_sum = hidden_ND.new_zeros((), dtype=acc_dtype)
        grad_h = torch.zeros_like(hidden_ND) if need_h else None
        grad_w = torch.zeros(weight_VD.shape, dtype=acc_dtype, device=weight_VD.device) if need_w else None
        # On the CPU only rows with a non-zero coefficient are computed (a host-side selection costs
        # nothing there and halves the work at mean t = 0.5); on accelerators every row is computed so
        # the step stays free of host synchronisation.
        if hidden_ND.device.type == "cpu":
            rows = torch.nonzero(coeff_N, as_tuple=True)[0]
        else:
            rows = None
        n_rows = hidden_ND.shape[0] if rows is None else rows.numel()
        # Logits and log-probs in float32 whatever the parameter dtype (docs/method.md §15.6: bf16 log-probs are
        # quantised); the one up-cast copy of W is the price of the plain-PyTorch path.
        weight = weight_VD if weight_VD.dtype == acc_dtype else weight_VD.to(acc_dtype)
        for start in range(0, n_rows, chunk_rows):
            idx = slice(start, start + chunk_rows) if rows is None else rows[start : start + chunk_rows]
            h = hidden_ND[idx].to(acc_dtype)  # [n, D]
            y = targets_N[idx].long()
            c = coeff_N[idx].to(acc_dtype)
            logits = h @ weight.t()  # [n, V]
            lse = torch.logsumexp(logits, dim=-1)
            nll = lse - logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
            loss += (c * nll).sum()
            nll_sum += (nll * (c != 0)).sum()
            if need_h or need_w:
                # d/dlogits of c * CE = c * (softmax - onehot), computed in place on the tile.
                accumulate_head_grads(logits, lse, y, c, h, weight, grad_h, grad_w, idx)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.grad_dtypes = (hidden_ND.dtype, weight_VD.dtype)
        ctx.mark_non_differentiable(nll_sum)
        return loss, nll_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_nll_sum):  # type: ignore[override]
        grad_h, grad_w = scaled_forward_grads(ctx, grad_loss, ctx.grad_dtypes)  # in place: one copy of dW at the peak
        return grad_h, grad_w, None, None, None


def fused_linear_masked_ce(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_N: torch.Tensor,
    coeff_N: torch.Tensor,
    *,
    chunk_rows: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked-diffusion CE through the LM head without materialising ``[N, V]`` logits.

    Args:
        hidden_ND: final hidden states of the x_t half, ``[N, D]`` (any float dtype).
        weight_VD: LM head weight ``[V, D]`` (the tied embedding for tied students).
        targets_N: clean token ids ``[N]``.
        coeff_N: per-row coefficient ``[N]`` float32 (weight x mask / normaliser); rows with 0 add nothing.
        chunk_rows: rows per logits tile; 0 picks a tile of about 256 MiB.

    Returns:
        ``(loss, nll_sum)``: the scalar loss ``sum(c * CE)`` (float32, float64 for float64 inputs), and
        the unweighted CE summed over rows with ``c != 0`` (a detached statistic for logging).
    """
    if hidden_ND.dim() != 2 or weight_VD.dim() != 2 or hidden_ND.shape[1] != weight_VD.shape[1]:
        raise ValueError(
            f"expected hidden [N, D] and weight [V, D] with equal D, got {tuple(hidden_ND.shape)} and "
            f"{tuple(weight_VD.shape)}"
        )
    if targets_N.shape != hidden_ND.shape[:1] or coeff_N.shape != hidden_ND.shape[:1]:
        raise ValueError(
            f"targets {tuple(targets_N.shape)} and coeff {tuple(coeff_N.shape)} must both be [N] = "
            f"[{hidden_ND.shape[0]}]"
        )
    chunk = chunk_rows or auto_chunk_rows(weight_VD.shape[0])
    return FusedLinearCEFunction.apply(hidden_ND, weight_VD, targets_N, coeff_N, chunk)
