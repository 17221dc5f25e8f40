"""Autograd op and public entry points of the fused LM-head loss (Triton).

:func:`fused_head_loss_triton` has the contract of :func:`tide_kernels.fused_head.fused_head_loss_pytorch`:
any loss of the student's per-token target log-probs ``lp_n = log softmax(h_n W^T)[y_n]``, without the
``[N, V]`` logits. The forward pass runs kernel 1 (``lse``, ``lp``), evaluates ``loss_fn`` on the small
``lp`` tensor with torch autograd to get ``g = dL/dlp`` (this is how a CALM chunk coefficient reaches
every token of its chunk, docs/method.md §5.4), then kernel 2 (``dh``, ``dW``). The gradients are stored
and only rescaled in backward, so the LM head weight is read in forward only (correct under ZeRO-3).
:func:`target_logprobs_triton` is kernel 1 alone (the teacher side, no gradient).

Legend: N flattened rows, D hidden, V vocabulary.
"""

from __future__ import annotations

import functools
import logging

import torch
from tide_kernels.common import check_dtype, is_interpreter, scaled_forward_grads
from tide_kernels.fused_head.kernel import fused_head_grad, fused_head_lse
from tide_kernels.fused_head.pytorch import LossFn, fused_head_loss_pytorch

__all__ = ["IMPLEMENTATIONS", "FusedHeadLossTritonFunction", "fused_head_loss_triton", "target_logprobs_triton"]

logger = logging.getLogger(__name__)

#: ``implementation=`` values: the Triton kernels, or the plain PyTorch tiled path ("reference": its old name).
IMPLEMENTATIONS = ("triton", "pytorch", "reference")
_INDEX_DTYPES = (torch.int32, torch.int64)


class FusedHeadLossTritonFunction(torch.autograd.Function):
    """Triton forward (loss, lp, term values, and the gradients); backward rescales the stored gradients.

    ``apply(hidden, weight, targets, rows, loss_fn, names_out, block_config)``; inputs are checked by
    :func:`fused_head_loss_triton`. ``rows`` is int8; the term names are appended to ``names_out``.
    ``block_config`` (tests) forces one tile shape instead of autotuning.
    """

    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, targets_N, rows_N, loss_fn, names_out, block_config):  # type: ignore[override]
        lse, lp = fused_head_lse(hidden_ND, weight_VD, targets_N, rows_N, block_config=block_config)
        needed = rows_N.to(lp.dtype)
        with torch.enable_grad():
            lp_var = lp.detach().requires_grad_(True)
            loss, terms = loss_fn(lp_var)
            (g,) = torch.autograd.grad(loss, lp_var, allow_unused=True)
        g = torch.zeros_like(lp) if g is None else (g.to(lp.dtype) * needed).contiguous()
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h, grad_w = fused_head_grad(
            hidden_ND, weight_VD, targets_N, g, lse, need_dh=need_h, need_dw=need_w, block_config=block_config
        )
        if grad_h is not None:
            grad_h = grad_h.to(hidden_ND.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.grad_dtypes = (hidden_ND.dtype, weight_VD.dtype)
        names_out.extend(terms)
        values = torch.stack([v.detach().to(lp.dtype).reshape(()) for v in terms.values()]) if terms else lp.new_zeros(0)
        ctx.mark_non_differentiable(lp, values)
        return loss.detach().to(lp.dtype), lp, values

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_):  # type: ignore[override]
        grad_h, grad_w = scaled_forward_grads(ctx, grad_loss, ctx.grad_dtypes)
        return grad_h, grad_w, None, None, None, None, None


@functools.cache
def _log_choice(implementation: str) -> None:
    logger.info("fused_head_loss: using the %s implementation", implementation)


def _check_inputs(
    hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor, rows_N: torch.Tensor, implementation: str
) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r} is not supported; expected one of {IMPLEMENTATIONS}")
    for name, t, dims in (("hidden", hidden_ND, "[N, D]"), ("weight", weight_VD, "[V, D]")):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 2-D tensor {dims}; got {shape}")
        check_dtype(name, t)
    if hidden_ND.shape[1] != weight_VD.shape[1]:
        raise ValueError(
            f"hidden {tuple(hidden_ND.shape)} and weight {tuple(weight_VD.shape)} must share the hidden size D"
        )
    if weight_VD.shape[0] == 0 or hidden_ND.shape[1] == 0:
        raise ValueError(f"weight {tuple(weight_VD.shape)} needs V >= 1 and D >= 1")
    if hidden_ND.dtype != weight_VD.dtype:
        raise ValueError(f"hidden ({hidden_ND.dtype}) and weight ({weight_VD.dtype}) must share one dtype")
    num_rows = hidden_ND.shape[0]
    if not isinstance(targets_N, torch.Tensor) or targets_N.shape != (num_rows,) or targets_N.dtype not in _INDEX_DTYPES:
        got = f"{targets_N.dtype} {tuple(targets_N.shape)}" if isinstance(targets_N, torch.Tensor) else type(targets_N).__name__
        raise ValueError(f"targets must be an int32/int64 tensor [N={num_rows}]; got {got}")
    if not isinstance(rows_N, torch.Tensor) or rows_N.shape != (num_rows,):
        got = tuple(rows_N.shape) if isinstance(rows_N, torch.Tensor) else type(rows_N).__name__
        raise ValueError(f"rows must be a bool tensor [N={num_rows}]; got {got}")
    for name, t in (("weight", weight_VD), ("targets", targets_N), ("rows", rows_N)):
        if t.device != hidden_ND.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden_ND.device}; put them on one device")
    if implementation == "triton" and hidden_ND.device.type != "cuda" and not is_interpreter():
        raise ValueError(
            f"implementation='triton' needs a CUDA device or TRITON_INTERPRET=1; hidden is on {hidden_ND.device}: "
            "use implementation='pytorch' on this machine"
        )


def _rows_int8(rows_N: torch.Tensor) -> torch.Tensor:
    return (rows_N != 0).to(torch.int8).contiguous()


def fused_head_loss_triton(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_N: torch.Tensor,
    rows_N: torch.Tensor,
    loss_fn: LossFn,
    *,
    implementation: str = "triton",
    block_config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``loss_fn`` of the student's target log-probs through the LM head, in two Triton sweeps.

    Args:
        hidden_ND: final hidden states ``[N, D]`` (any strides), bf16/fp16/fp32 (fp64: interpreter/exact tests).
        weight_VD: LM head weight ``[V, D]`` in hidden's dtype (a tied embedding is fine).
        targets_N: clean ids ``[N]``, int32/int64; out-of-range ids on rows not needed are harmless.
        rows_N: bool ``[N]``, rows any term needs; other rows get ``lp = 0`` and no gradient.
        loss_fn: ``lp [N] float32 (float64) -> (scalar loss, {term name: scalar})``, differentiable in ``lp``,
            a pure function of ``lp`` (evaluated once, in the forward pass).
        implementation: ``"triton"`` or ``"pytorch"`` (:func:`~tide_kernels.fused_head.pytorch.fused_head_loss_pytorch`;
            ``"reference"`` is its old name).
        block_config: tests only: ``BLOCK_N``/``BLOCK_V``/``BLOCK_D`` instead of autotuning.

    Returns:
        ``(loss, lp [N] detached, {term: detached scalar})``; loss and lp in float32 (float64 for fp64).
    """
    _check_inputs(hidden_ND, weight_VD, targets_N, rows_N, implementation)
    _log_choice(implementation)
    if implementation in ("pytorch", "reference"):
        return fused_head_loss_pytorch(hidden_ND, weight_VD, targets_N, rows_N.bool(), loss_fn)
    names: list[str] = []
    loss, lp, values = FusedHeadLossTritonFunction.apply(
        hidden_ND, weight_VD, targets_N, _rows_int8(rows_N), loss_fn, names, block_config
    )
    return loss, lp, dict(zip(names, values.unbind(0)))


@torch.no_grad()
def target_logprobs_triton(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_N: torch.Tensor,
    rows_N: torch.Tensor,
    *,
    block_config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Target log-probs ``lp [N]`` (float32, float64 for fp64; 0 on rows not needed), no gradient: the teacher side."""
    _check_inputs(hidden_ND, weight_VD, targets_N, rows_N, "triton")
    return fused_head_lse(hidden_ND, weight_VD, targets_N, _rows_int8(rows_N), block_config=block_config)[1]
