"""Triton kernels of the fused LM-head loss: per-row log-sum-exp / target log-prob, and the gradients.

Legend: N flattened rows, D hidden, V vocabulary. hidden ``[N, D]``, weight ``[V, D]`` (any strides),
targets ``[N]`` (int32/int64), rows ``[N]`` (int8, 1 = the row is needed).

* :func:`_lse_fwd_kernel`, one program per row tile: logits ``[BLOCK_N, BLOCK_V]`` tile by tile (an inner
  loop over ``BLOCK_D`` slices of D), online log-sum-exp over the vocabulary tiles, and the target logit
  picked out of the tile that holds it. Stores ``lse [N]`` and ``lp = target - lse`` (0 on rows not
  needed). ``[N, V]`` is never materialised.
* :func:`_grad_kernel`, one program per (row tile, vocab tile): recomputes the logits tile, forms
  ``dlogits = g * (onehot - exp(logit - lse))`` and adds ``dlogits @ W`` into ``dh`` and
  ``dlogits^T @ h`` into ``dW``, one ``BLOCK_D`` slice at a time, with ``tl.atomic_add``.

Why atomics: a race-free alternative needs either a full-D accumulator per program (``[BLOCK_N, D]`` and
``[BLOCK_V, D]`` in registers, too large at D = 1024) or a recomputation of the logits tile per D slice
(``D / BLOCK_D`` times the matmul work); read-modify-write of a global accumulator by its owning program
is not safe either, because a load and a store of one element may run on different threads of the
program. Atomics compute each logits tile exactly once in the backward sweep; the price is a
non-deterministic summation order of fp32 (fp64) partial sums, i.e. last-bit differences between runs.
Programs whose rows all have ``g = 0`` (rows not needed, or no loss on them) return at once.

Numerics: accumulation in float32 (float64 for float64 inputs); ``tl.dot`` with ``input_precision="ieee"``
for fp32/fp64 (16-bit inputs use the tensor cores; ``dlogits`` is rounded to the input dtype before its
two matmuls, FlashAttention practice).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from tide_kernels.common import autotune_configs, compute_dtypes, logits_tile, pick_kernel

__all__ = ["fused_head_grad", "fused_head_lse"]

_KEY = ["V", "D"]
# The interpreter runs each tile operation as one numpy call, so its cost is per operation, not per element:
# 32 x 64 x 32 tiles run about 10x faster than 16 x 16 x 16 ones there. Tests force 16-wide tiles with
# block_config where they need many tiles on a small problem.
_INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_D": 32}, num_warps=1, num_stages=1)


def _configs(blocks: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_N": n, "BLOCK_V": v, "BLOCK_D": d}, num_warps=w, num_stages=s)
        for n, v, d, w, s in blocks
    ]


# (BLOCK_N, BLOCK_V, BLOCK_D, warps, stages): not yet tuned on a device; the autotuner picks among these.
_FWD_CONFIGS = _configs([(128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (64, 256, 64, 8, 3)])
# The gradient kernel holds two [BLOCK_N, BLOCK_V] fp32 tiles (logits, dlogits): 128 x 128 with 8 warps is
# the largest that should not spill; larger tiles would mean fewer atomics per element (V / BLOCK_V on dh,
# N / BLOCK_N on dW).
_GRAD_CONFIGS = _configs([(128, 128, 64, 8, 3), (128, 128, 32, 8, 2), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3)])


@triton.autotune(configs=autotune_configs(_FWD_CONFIGS, _INTERPRETER_CONFIG), key=_KEY)
@triton.jit
def _lse_fwd_kernel(
    h_ptr, w_ptr, tgt_ptr, rows_ptr, lse_ptr, lp_ptr,
    stride_hn, stride_hd, stride_wv, stride_wd,
    N, V, D,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    needed = tl.load(rows_ptr + rows, mask=row_ok, other=0) != 0
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    rows64 = rows.to(tl.int64)
    m_i = tl.full((BLOCK_N,), float("-inf"), dtype=ACC_DTYPE)
    l_i = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    t_i = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    offs_v = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs_v
        col_ok = cols < V
        s = logits_tile(h_ptr, w_ptr, rows64, cols.to(tl.int64), row_ok, col_ok, stride_hn, stride_hd,
                         stride_wv, stride_wd, D, BLOCK_N, BLOCK_V, BLOCK_D, ACC_DTYPE, DOT_PRECISION)
        t_i += tl.sum(tl.where(cols[None, :] == tgt[:, None], s, 0.0), axis=1)
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile has at least one column
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    lse = m_i + tl.log(l_i)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(lp_ptr + rows, tl.where(needed, t_i - lse, 0.0), mask=row_ok)


@triton.autotune(configs=autotune_configs(_GRAD_CONFIGS, _INTERPRETER_CONFIG), key=_KEY, reset_to_zero=["dh_ptr", "dw_ptr"])
@triton.jit
def _grad_kernel(
    h_ptr, w_ptr, tgt_ptr, g_ptr, lse_ptr, dh_ptr, dw_ptr,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_dhn, stride_dhd, stride_dwv, stride_dwd,
    N, V, D,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    if tl.max(tl.abs(g), axis=0) > 0:
        rows64 = rows.to(tl.int64)
        cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        cols64 = cols.to(tl.int64)
        tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        s = logits_tile(h_ptr, w_ptr, rows64, cols64, row_ok, col_ok, stride_hn, stride_hd, stride_wv,
                         stride_wd, D, BLOCK_N, BLOCK_V, BLOCK_D, ACC_DTYPE, DOT_PRECISION)
        p = tl.where(col_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
        onehot = tl.where(cols64[None, :] == tgt[:, None], 1.0, 0.0).to(ACC_DTYPE)
        dz = g[:, None] * (onehot - p)  # [BLOCK_N, BLOCK_V], 0 on rows/columns out of range
        offs_d = tl.arange(0, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            d_ok = d < D
            if NEED_DH:
                w = tl.load(w_ptr + cols64[:, None] * stride_wv + d[None, :] * stride_wd,
                            mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                dh = tl.dot(dz.to(w.dtype), w, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
                tl.atomic_add(dh_ptr + rows64[:, None] * stride_dhn + d[None, :] * stride_dhd, dh,
                              mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")
            if NEED_DW:
                h = tl.load(h_ptr + rows64[:, None] * stride_hn + d[None, :] * stride_hd,
                            mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                dw = tl.dot(tl.trans(dz.to(h.dtype)), h, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
                tl.atomic_add(dw_ptr + cols64[:, None] * stride_dwv + d[None, :] * stride_dwd, dw,
                              mask=col_ok[:, None] & d_ok[None, :], sem="relaxed")


def fused_head_lse(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_N: torch.Tensor,
    rows_N: torch.Tensor,
    *,
    block_config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch kernel 1: ``(lse [N], lp [N])`` in float32 (float64 for float64 inputs).

    Inputs are validated by :mod:`tide_kernels.fused_head.op`; ``rows_N`` is int8 (1 = needed).
    """
    num_rows, hidden = hidden_ND.shape
    vocab = weight_VD.shape[0]
    acc_dtype, tl_acc, precision = compute_dtypes(hidden_ND.dtype)
    lse = torch.empty(num_rows, dtype=acc_dtype, device=hidden_ND.device)
    lp = torch.empty_like(lse)
    if num_rows == 0:
        return lse, lp
    kernel, meta = pick_kernel(_lse_fwd_kernel, block_config)
    grid = lambda m: (triton.cdiv(num_rows, m["BLOCK_N"]),)
    kernel[grid](
        hidden_ND, weight_VD, targets_N, rows_N, lse, lp,
        *hidden_ND.stride(), *weight_VD.stride(), num_rows, vocab, hidden,
        ACC_DTYPE=tl_acc, DOT_PRECISION=precision, **meta,
    )
    return lse, lp


def fused_head_grad(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_N: torch.Tensor,
    g_N: torch.Tensor,
    lse_N: torch.Tensor,
    *,
    need_dh: bool = True,
    need_dw: bool = True,
    block_config: dict[str, int] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Launch kernel 2: ``(dh [N, D], dW [V, D])`` of ``sum_n g_n lp_n``, in the accumulator dtype
    (float32, float64 for float64 inputs); ``None`` for a gradient not asked for.

    ``g_N`` and ``lse_N`` are in the accumulator dtype; rows with ``g = 0`` contribute nothing.
    """
    num_rows, hidden = hidden_ND.shape
    vocab = weight_VD.shape[0]
    acc_dtype, tl_acc, precision = compute_dtypes(hidden_ND.dtype)
    dh = torch.zeros((num_rows, hidden), dtype=acc_dtype, device=hidden_ND.device) if need_dh else None
    dw = torch.zeros((vocab, hidden), dtype=acc_dtype, device=hidden_ND.device) if need_dw else None
    if num_rows == 0 or not (need_dh or need_dw):
        return dh, dw
    # A gradient not asked for gets a private 1x1 dummy (never written: NEED_DH / NEED_DW are constexpr),
    # so that the autotuner's reset_to_zero never touches a caller's tensor.
    dummy = torch.zeros((1, 1), dtype=acc_dtype, device=hidden_ND.device)
    dh_arg = dh if dh is not None else dummy
    dw_arg = dw if dw is not None else dummy
    kernel, meta = pick_kernel(_grad_kernel, block_config)
    grid = lambda m: (triton.cdiv(num_rows, m["BLOCK_N"]), triton.cdiv(vocab, m["BLOCK_V"]))
    kernel[grid](
        hidden_ND, weight_VD, targets_N, g_N, lse_N, dh_arg, dw_arg,
        *hidden_ND.stride(), *weight_VD.stride(), *dh_arg.stride(), *dw_arg.stride(),
        num_rows, vocab, hidden,
        NEED_DH=need_dh, NEED_DW=need_dw, ACC_DTYPE=tl_acc, DOT_PRECISION=precision, **meta,
    )
    return dh, dw
