"""Autograd op and checked entry point of the fused token divergences (Triton kernels or the PyTorch tiles).

:func:`fused_token_divergence` takes the student's rows and head and the teacher's rows and head, and
returns ``sum_n sum_k coeff[n, k] D_k[n]`` over the three token divergences (forward KL, reverse KL,
TIDAL; the maths in :mod:`tide_kernels.fused_divergence.pytorch`) with the per-row divergences, never
building ``[N, V']`` logits on either side. The heads are cut to the shared prefix V' by slicing (a view;
nothing is copied or converted as a whole). The student's gradients (rows and head) are formed in the
forward pass and only rescaled in backward, so both heads are read in forward only: under ZeRO-3 they
need to be gathered for the forward alone.

Legend: N rows, V / V_t student / teacher vocabulary, V' shared prefix, D_s / D_t hidden sizes.
"""

from __future__ import annotations

import torch
from tide_kernels.common import FLOAT_DTYPES, check_dtype, is_interpreter, scaled_forward_grads
from tide_kernels.fused_divergence.kernel import divergence_grad, divergence_stats
from tide_kernels.fused_divergence.pytorch import VOCAB_TILE, accumulation_dtype, divergence_sweeps_pytorch

__all__ = ["IMPLEMENTATIONS", "FusedTokenDivergenceFunction", "fused_token_divergence"]

#: ``implementation=`` values: the Triton kernels, or the tiled PyTorch path.
IMPLEMENTATIONS = ("triton", "pytorch")


def _run(s_hidden, s_weight, t_hidden, t_weight, coeff_N3, lam_N, temperature, implementation, chunk_rows,
         vocab_tile, block_config, need_dh, need_dw, dw_out):
    """``(div [N, 3], dh | None, dW [V', D_s] | None)`` from the chosen implementation (heads already cut to V')."""
    if implementation == "pytorch":
        rows = coeff_N3.ne(0).any(1) if s_hidden.device.type == "cpu" else None  # the CPU visits only rows that count
        return divergence_sweeps_pytorch(
            s_hidden, s_weight, t_hidden, t_weight, coeff_N3, lam_N, temperature=temperature, rows_N=rows,
            need_dh=need_dh, need_dw=need_dw, dw_out=dw_out, chunk_rows=chunk_rows, vocab_tile=vocab_tile or VOCAB_TILE,
        )
    # Which terms are present is a constexpr of the kernels; the host reads it from the coefficients on the
    # CPU (interpreter) and assumes all three elsewhere (no host synchronisation on a GPU).
    present = coeff_N3.ne(0).any(0).tolist() if s_hidden.device.type == "cpu" else [True, True, True]
    has_rev, has_tid = bool(present[1]), bool(present[2])
    lse, div = divergence_stats(s_hidden, s_weight, t_hidden, t_weight, lam_N, temperature=temperature,
                                has_rev=has_rev, has_tid=has_tid, block_config=block_config)
    dh, dw = divergence_grad(
        s_hidden, s_weight, t_hidden, t_weight, lam_N, coeff_N3.t().contiguous(), lse, div, temperature=temperature,
        has_rev=has_rev, has_tid=has_tid, need_dh=need_dh, need_dw=need_dw, dw_out=dw_out, block_config=block_config,
    )
    return div.t(), dh, dw


class FusedTokenDivergenceFunction(torch.autograd.Function):
    """``(total, div [N, 3])``: total differentiable in the student's rows and head; gradients formed in forward.

    ``apply(s_hidden, s_weight, t_hidden, t_weight, coeff [N, 3], lam [N], vocab, temperature, implementation,
    chunk_rows, vocab_tile, block_config)``; inputs are checked by :func:`fused_token_divergence`.
    """

    @staticmethod
    def forward(ctx, s_hidden, s_weight, t_hidden, t_weight, coeff_N3, lam_N, vocab, temperature, implementation,  # type: ignore[override]
                chunk_rows, vocab_tile, block_config):
        acc = accumulation_dtype(s_hidden)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_w = torch.zeros(s_weight.shape, dtype=acc, device=s_weight.device) if need_w else None
        div, grad_h, _ = _run(
            s_hidden, s_weight[:vocab], t_hidden, t_weight[:vocab], coeff_N3, lam_N, temperature, implementation,
            chunk_rows, vocab_tile, block_config, need_h, need_w, None if grad_w is None else grad_w[:vocab],
        )
        total = (coeff_N3 * div).sum()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.grad_dtypes = (s_hidden.dtype, s_weight.dtype)
        ctx.mark_non_differentiable(div)
        return total, div

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, _grad_div):  # type: ignore[override]
        grad_h, grad_w = scaled_forward_grads(ctx, grad_total, ctx.grad_dtypes)
        return grad_h, grad_w, None, None, None, None, None, None, None, None, None, None


def _check(s_hidden, s_weight, t_hidden, t_weight, coeff_N3, lam_N, vocab, temperature, implementation) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r} is not one of {list(IMPLEMENTATIONS)}")
    tensors = (("student hidden", s_hidden, "[N, D_s]"), ("student head", s_weight, "[V, D_s]"),
               ("teacher hidden", t_hidden, "[N, D_t]"), ("teacher head", t_weight, "[V_t, D_t]"))
    for name, t, dims in tensors:
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 2-D tensor {dims}; got {got}")
        check_dtype(name, t, FLOAT_DTYPES)
        if t.device != s_hidden.device:
            raise ValueError(f"{name} is on {t.device} but the student hidden rows are on {s_hidden.device}; use one device")
    if s_hidden.shape[1] != s_weight.shape[1] or t_hidden.shape[1] != t_weight.shape[1]:
        raise ValueError(
            f"hidden sizes disagree: student rows {tuple(s_hidden.shape)} vs head {tuple(s_weight.shape)}, teacher rows "
            f"{tuple(t_hidden.shape)} vs head {tuple(t_weight.shape)}"
        )
    if s_hidden.dtype != s_weight.dtype or t_hidden.dtype != t_weight.dtype:
        raise ValueError(
            f"rows and head must share a dtype per model: student {s_hidden.dtype}/{s_weight.dtype}, teacher "
            f"{t_hidden.dtype}/{t_weight.dtype}"
        )
    n = s_hidden.shape[0]
    if t_hidden.shape[0] != n:
        raise ValueError(f"student rows {tuple(s_hidden.shape)} and teacher rows {tuple(t_hidden.shape)} must have the same N")
    if not 0 < vocab <= min(s_weight.shape[0], t_weight.shape[0]):
        raise ValueError(
            f"shared vocabulary V'={vocab} must lie in [1, min(V, V_t)] = [1, {min(s_weight.shape[0], t_weight.shape[0])}] "
            "(distill.shared_vocab_size)"
        )
    if coeff_N3.shape != (n, 3) or lam_N.shape != (n,):
        raise ValueError(f"coefficients {tuple(coeff_N3.shape)} and lambda {tuple(lam_N.shape)} must be [N, 3] and [N], N={n}")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    if implementation == "triton" and s_hidden.device.type != "cuda" and not is_interpreter():
        raise ValueError(
            f"implementation='triton' needs a CUDA device or TRITON_INTERPRET=1; the rows are on {s_hidden.device}: "
            "use implementation='pytorch' on this machine"
        )


def fused_token_divergence(
    s_hidden_ND: torch.Tensor,
    s_weight_VD: torch.Tensor,
    t_hidden_NE: torch.Tensor,
    t_weight_WE: torch.Tensor,
    coeff_N3: torch.Tensor,
    lam_N: torch.Tensor,
    *,
    vocab: int,
    temperature: float,
    implementation: str = "triton",
    chunk_rows: int = 0,
    vocab_tile: int = 0,
    block_config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_n sum_k coeff[n, k] D_k[n]`` of the three token divergences on the shared prefix, and ``D [N, 3]``.

    Args:
        s_hidden_ND: student rows ``[N, D_s]`` (differentiable), any strides.
        s_weight_VD: student head ``[V, D_s]`` (differentiable; gradient 0 beyond V').
        t_hidden_NE: teacher rows ``[N, D_t]``; a constant.
        t_weight_WE: teacher head ``[V_t, D_t]``; a constant.
        coeff_N3: per-row coefficients of (forward KL, reverse KL, TIDAL); rows with all zeros cost nothing on
            the CPU and no gradient work anywhere.
        lam_N: TIDAL's per-row lambda (any values when no TIDAL coefficient is set).
        vocab: V', the shared prefix of both heads.
        temperature: T; the logits of both models are divided by it.
        implementation: ``"triton"`` or ``"pytorch"``.
        chunk_rows: rows per tile of the PyTorch path (0: automatic).
        vocab_tile: vocabulary columns per tile of the PyTorch path (0: 4,096).
        block_config: tests only: ``BLOCK_N``/``BLOCK_V``/``BLOCK_D`` of the kernels instead of autotuning.

    Returns:
        ``(total, D [N, 3] detached)`` in float32 (float64 for float64 student rows).
    """
    _check(s_hidden_ND, s_weight_VD, t_hidden_NE, t_weight_WE, coeff_N3, lam_N, vocab, temperature, implementation)
    acc = accumulation_dtype(s_hidden_ND)
    return FusedTokenDivergenceFunction.apply(
        s_hidden_ND, s_weight_VD, t_hidden_NE.detach(), t_weight_WE.detach(), coeff_N3.detach().to(acc).contiguous(),
        lam_N.detach().to(acc).contiguous(), int(vocab), float(temperature), implementation, int(chunk_rows),
        int(vocab_tile), block_config,
    )
