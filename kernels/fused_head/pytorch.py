"""Tiled PyTorch implementation of the fused LM-head loss (``model.loss_implementation=pytorch``, the CPU path).

Legend: N flattened rows (the x_t half, B * L), D hidden, V vocabulary.

CE and the CALM family depend on the student logits only through ``lp_n = log softmax(h_n W^T)[y_n]``
(docs/method.md §1.4, §5.1). The upstream gradient of a token, ``g_n = dL/dlp_n``, is known only once
every chunk is summed (the CALM coefficient of a chunk is shared by all its tokens, docs/method.md §5.4), so
:func:`fused_head_loss_pytorch` runs two sweeps over row tiles in its forward pass, never holding
``[N, V]``:

1. logits tile by tile -> ``lse`` and ``lp`` (float32; float64 end to end for float64 inputs);
2. ``L = loss_fn(lp)`` on the small ``[N]`` / ``[B, C]`` tensors with autograd, giving ``g = dL/dlp``;
3. logits recomputed tile by tile -> ``dlogits = g * (onehot - softmax)`` -> ``dh``, ``dW``.

The gradients are stored and only rescaled in backward, so the LM head weight is used in forward only
(which keeps it correct under ZeRO-3, where the weight is gathered for the forward). This is the path
the trainer takes on a machine without a GPU (``model.loss_implementation=pytorch``, or ``auto`` there).

* :func:`target_logprobs_pytorch` is sweep 1 alone under ``no_grad`` (the teacher side).

The dense ground truth of the tests (full ``[N, V]`` logits) is :mod:`tide_kernels.fused_head.naive`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tide_kernels.common import accumulate_head_grads, scaled_forward_grads

__all__ = [
    "FusedHeadLossFunction",
    "LossFn",
    "auto_chunk_rows",
    "fused_head_loss_pytorch",
    "target_logprobs_pytorch",
]

LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]

#: Logit tile budget of one row tile, in float32 elements (64 Mi elements = 256 MiB).
TILE_ELEMENTS = 64 * 1024 * 1024


def auto_chunk_rows(vocab_size: int) -> int:
    """Rows per logits tile so that one ``[rows, V]`` float32 tile holds about :data:`TILE_ELEMENTS`."""
    return max(16, TILE_ELEMENTS // max(1, vocab_size))


def _accumulation_dtype(hidden_ND: torch.Tensor) -> torch.dtype:
    return torch.float64 if hidden_ND.dtype == torch.float64 else torch.float32


def _tiles(hidden_ND: torch.Tensor, rows_N: torch.Tensor, chunk: int):
    """Row index tiles: on the CPU only the needed rows (free there), elsewhere all rows (no host sync)."""
    if hidden_ND.device.type == "cpu":
        rows = torch.nonzero(rows_N, as_tuple=True)[0]
        return [rows[s : s + chunk] for s in range(0, rows.numel(), chunk)]
    return [slice(s, s + chunk) for s in range(0, hidden_ND.shape[0], chunk)]


def _check_shapes(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor, rows_N: torch.Tensor) -> None:
    if hidden_ND.dim() != 2 or weight_VD.dim() != 2 or hidden_ND.shape[1] != weight_VD.shape[1]:
        raise ValueError(
            f"expected hidden [N, D] and weight [V, D] with equal D, got {tuple(hidden_ND.shape)} and "
            f"{tuple(weight_VD.shape)}"
        )
    if targets_N.shape != hidden_ND.shape[:1] or rows_N.shape != hidden_ND.shape[:1]:
        raise ValueError(f"targets {tuple(targets_N.shape)} and rows {tuple(rows_N.shape)} must be [N] = [{hidden_ND.shape[0]}]")


def _safe_targets(targets_N: torch.Tensor, vocab: int) -> torch.Tensor:
    """int64 ids clamped into ``[0, V)``: an ignore id (-100) on a row not needed must not break gather."""
    return targets_N.long().clamp(0, vocab - 1)


def _lse_and_lp(hidden_ND, weight, targets_N, tiles, acc):
    targets_N = _safe_targets(targets_N, weight.shape[0])
    lp = torch.zeros(hidden_ND.shape[0], dtype=acc, device=hidden_ND.device)
    lse = torch.zeros_like(lp)
    for idx in tiles:
        logits = hidden_ND[idx].to(acc) @ weight.t()  # [n, V]
        lse[idx] = torch.logsumexp(logits, dim=-1)
        lp[idx] = logits.gather(-1, targets_N[idx].unsqueeze(-1)).squeeze(-1) - lse[idx]
    return lse, lp


class FusedHeadLossFunction(torch.autograd.Function):
    """``loss_fn(lp)`` with ``dh``/``dW`` computed in forward, tile by tile; backward rescales them.

    ``apply(hidden, weight, targets, rows (bool), loss_fn, chunk_rows, names_out)``; the term names are
    appended to ``names_out`` (autograd functions return tensors only).
    """

    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, targets_N, rows_N, loss_fn, chunk_rows, names_out):  # type: ignore[override]
        acc = _accumulation_dtype(hidden_ND)
        weight = weight_VD if weight_VD.dtype == acc else weight_VD.to(acc)
        tiles = _tiles(hidden_ND, rows_N, chunk_rows)
        lse, lp = _lse_and_lp(hidden_ND, weight, targets_N, tiles, acc)
        lp = lp * rows_N  # rows that are not needed carry exactly 0 (and get no gradient below)
        with torch.enable_grad():
            lp_var = lp.detach().requires_grad_(True)
            loss, terms = loss_fn(lp_var)
            (g,) = torch.autograd.grad(loss, lp_var, allow_unused=True)
        g = torch.zeros_like(lp) if g is None else g.to(acc) * rows_N
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden_ND) if need_h else None
        grad_w = torch.zeros(weight_VD.shape, dtype=acc, device=weight_VD.device) if need_w else None
        if need_h or need_w:
            targets_N = _safe_targets(targets_N, weight.shape[0])
            for idx in tiles:
                h = hidden_ND[idx].to(acc)
                # d lp / d logits = onehot - softmax = -(d CE / d logits), times the upstream g of the row
                accumulate_head_grads(h @ weight.t(), lse[idx], targets_N[idx], -g[idx], h, weight, grad_h, grad_w, idx)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.grad_dtypes = (hidden_ND.dtype, weight_VD.dtype)
        names_out.extend(terms)
        values = torch.stack([v.detach().to(acc).reshape(()) for v in terms.values()]) if terms else lp.new_zeros(0)
        ctx.mark_non_differentiable(lp, values)
        return loss.detach().to(acc), lp, values

    @staticmethod
    def backward(ctx, grad_loss, *_):  # type: ignore[override]
        grad_h, grad_w = scaled_forward_grads(ctx, grad_loss, ctx.grad_dtypes)
        return grad_h, grad_w, None, None, None, None, None


def fused_head_loss_pytorch(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_N: torch.Tensor,
    rows_N: torch.Tensor,
    loss_fn: LossFn,
    *,
    chunk_rows: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``loss_fn`` of the student's target log-probs through the LM head, without ``[N, V]`` logits.

    Args:
        hidden_ND: final hidden states of the x_t half ``[N, D]``.
        weight_VD: LM head weight ``[V, D]`` (tied embedding for tied students).
        targets_N: clean ids ``[N]``.
        rows_N: bool ``[N]``, rows any term needs (masked tokens); other rows get ``lp = 0`` and no gradient.
        loss_fn: ``lp [N] float32 -> (scalar loss, {term name: scalar})``, differentiable in ``lp``; it must
            be a pure function of ``lp`` (it is evaluated once, inside the forward pass).
        chunk_rows: rows per logits tile; 0 = :func:`auto_chunk_rows`.

    Returns:
        ``(loss, lp [N] detached, {term: detached scalar})``, float32 (float64 for float64 inputs).
    """
    _check_shapes(hidden_ND, weight_VD, targets_N, rows_N)
    chunk = chunk_rows or auto_chunk_rows(weight_VD.shape[0])
    names: list[str] = []
    loss, lp, values = FusedHeadLossFunction.apply(hidden_ND, weight_VD, targets_N, rows_N.bool(), loss_fn, chunk, names)
    return loss, lp, dict(zip(names, values.unbind(0)))


@torch.no_grad()
def target_logprobs_pytorch(
    hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor, rows_N: torch.Tensor, *, chunk_rows: int = 0
) -> torch.Tensor:
    """``lp [N] = log softmax(h W^T)[target]`` on rows where ``rows_N``, 0 elsewhere; no gradient (teacher side).

    Float32 (float64 for float64 inputs); sweep 1 of :func:`fused_head_loss_pytorch`.
    """
    _check_shapes(hidden_ND, weight_VD, targets_N, rows_N)
    acc = _accumulation_dtype(hidden_ND)
    weight = weight_VD if weight_VD.dtype == acc else weight_VD.to(acc)
    rows_N = rows_N.bool()
    tiles = _tiles(hidden_ND, rows_N, chunk_rows or auto_chunk_rows(weight_VD.shape[0]))
    return _lse_and_lp(hidden_ND, weight, targets_N, tiles, acc)[1] * rows_N
