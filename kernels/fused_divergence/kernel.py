"""Triton kernels of the fused token divergences: per-row statistics, then the student's gradients.

Legend: N rows, V' shared vocabulary prefix, D_s / D_t student / teacher hidden. Student rows ``hs [N, D_s]``
and head ``ws [V', D_s]``; teacher rows ``ht [N, D_t]`` and head ``wt [V', D_t]`` (any strides: the heads
are views of the first V' rows of the full heads). ``a = hs ws^T / T``, ``b = ht wt^T / T``,
``c = (1 - lambda) a + lambda b``. The maths is the docstring of :mod:`tide_kernels.fused_divergence.pytorch`.

* :func:`_stats_kernel`, one program per row tile: for each vocabulary tile, the student and the teacher
  logits tiles (each an inner loop over its own hidden size), then the online log-sum-exp of a, b, c with
  the expectations ``E_{P_T}[b - a]``, ``E_{P_S}[a - b]``, ``E_r[c - a]`` rescaled alongside. Stores
  ``lse [3, N]`` and the divergences ``div [3, N]`` (forward KL, reverse KL, TIDAL).
* :func:`_grad_kernel`, one program per (row tile, vocabulary tile): recomputes both logits tiles, forms
  ``dz = (1/T) [(c_f + c_t) P_S - c_f P_T - c_t r + c_r P_S (a - b - lse_a + lse_b - D_rev)]`` and adds
  ``dz ws`` into ``dh`` and ``dz^T hs`` into ``dW`` with atomics, one ``BLOCK_D`` slice at a time (the
  reasoning of :mod:`tide_kernels.fused_head.kernel`). Row tiles whose coefficients are all 0 return at once.

``HAS_REV`` / ``HAS_TID`` (constexpr) drop the reverse-KL and TIDAL work when no term asks for it.
Numerics: float32 accumulation (float64 for float64 inputs); ``dz`` is rounded to the student's dtype
before its two matmuls.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from tide_kernels.common import autotune_configs, compute_dtypes, logits_tile, pick_kernel

__all__ = ["divergence_grad", "divergence_stats"]

_KEY = ["V", "DS", "DT", "HAS_REV", "HAS_TID"]
_INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_D": 32}, num_warps=1, num_stages=1)


def _configs(blocks: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_N": n, "BLOCK_V": v, "BLOCK_D": d}, num_warps=w, num_stages=s)
        for n, v, d, w, s in blocks
    ]


# (BLOCK_N, BLOCK_V, BLOCK_D, warps, stages); not tuned on a device yet, but none spills on sm_90 (bf16, checked
# by tests/kernels/compile_report.py). The statistics kernel holds the a, b (and c) tiles plus nine per-row
# running values (128 x 64 with 3 stages, 64 x 64 with 3 stages and 128 x 128 spilled); the gradient kernel
# holds a, b, P_S and dz at once, so its tiles are smaller than the fused head's.
STATS_CONFIGS = _configs([(64, 128, 64, 8, 3), (128, 64, 64, 8, 2), (64, 128, 32, 8, 2), (64, 64, 64, 4, 2)])
GRAD_CONFIGS = _configs([(64, 128, 64, 8, 3), (64, 64, 64, 4, 3), (128, 64, 32, 8, 2), (32, 128, 64, 4, 3)])


@triton.jit
def _online(m, s, u, x, y, col_ok):
    """One vocabulary tile of the running (max, sum exp, sum exp * y) of the rows of ``x``."""
    x = tl.where(col_ok[None, :], x, float("-inf"))
    m_new = tl.maximum(m, tl.max(x, axis=1))  # finite: every tile has at least one column in range
    scale = tl.exp(m - m_new)
    e = tl.exp(x - m_new[:, None])
    s = s * scale + tl.sum(e, axis=1)
    u = u * scale + tl.sum(e * tl.where(col_ok[None, :], y, 0.0), axis=1)
    return m_new, s, u


@triton.autotune(configs=autotune_configs(STATS_CONFIGS, _INTERPRETER_CONFIG), key=_KEY)
@triton.jit
def _stats_kernel(
    hs_ptr, ws_ptr, ht_ptr, wt_ptr, lam_ptr, lse_ptr, div_ptr,
    stride_hsn, stride_hsd, stride_wsv, stride_wsd, stride_htn, stride_htd, stride_wtv, stride_wtd,
    N, V, DS, DT, invt_ptr,
    HAS_REV: tl.constexpr, HAS_TID: tl.constexpr, ACC_DTYPE: tl.constexpr,
    DOT_S: tl.constexpr, DOT_T: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    inv_t = tl.load(invt_ptr)
    lam = tl.load(lam_ptr + rows, mask=row_ok, other=0.0)
    m_a = tl.full((BLOCK_N,), float("-inf"), dtype=ACC_DTYPE)
    s_a = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    u_a = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    m_b = tl.full((BLOCK_N,), float("-inf"), dtype=ACC_DTYPE)
    s_b = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    u_b = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    m_c = tl.full((BLOCK_N,), float("-inf"), dtype=ACC_DTYPE)
    s_c = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    u_c = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    offs_v = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs_v
        col_ok = cols < V
        cols64 = cols.to(tl.int64)
        a = logits_tile(hs_ptr, ws_ptr, rows64, cols64, row_ok, col_ok, stride_hsn, stride_hsd, stride_wsv,
                        stride_wsd, DS, BLOCK_N, BLOCK_V, BLOCK_D, ACC_DTYPE, DOT_S) * inv_t
        b = logits_tile(ht_ptr, wt_ptr, rows64, cols64, row_ok, col_ok, stride_htn, stride_htd, stride_wtv,
                        stride_wtd, DT, BLOCK_N, BLOCK_V, BLOCK_D, ACC_DTYPE, DOT_T) * inv_t
        m_a, s_a, u_a = _online(m_a, s_a, u_a, a, a - b, col_ok)
        m_b, s_b, u_b = _online(m_b, s_b, u_b, b, b - a, col_ok)
        if HAS_TID:
            c = a + lam[:, None] * (b - a)
            m_c, s_c, u_c = _online(m_c, s_c, u_c, c, c - a, col_ok)
    lse_a = m_a + tl.log(s_a)
    lse_b = m_b + tl.log(s_b)
    tl.store(lse_ptr + rows, lse_a, mask=row_ok)
    tl.store(lse_ptr + N + rows, lse_b, mask=row_ok)
    tl.store(div_ptr + rows, u_b / s_b - lse_b + lse_a, mask=row_ok)
    if HAS_REV:
        tl.store(div_ptr + N + rows, u_a / s_a - lse_a + lse_b, mask=row_ok)
    if HAS_TID:
        lse_c = m_c + tl.log(s_c)
        tl.store(lse_ptr + 2 * N + rows, lse_c, mask=row_ok)
        tl.store(div_ptr + 2 * N + rows, u_c / s_c - lse_c + lse_a, mask=row_ok)


@triton.autotune(configs=autotune_configs(GRAD_CONFIGS, _INTERPRETER_CONFIG), key=_KEY,
                 reset_to_zero=["dh_ptr", "dw_ptr"])
@triton.jit
def _grad_kernel(
    hs_ptr, ws_ptr, ht_ptr, wt_ptr, lam_ptr, coeff_ptr, lse_ptr, div_ptr, dh_ptr, dw_ptr,
    stride_hsn, stride_hsd, stride_wsv, stride_wsd, stride_htn, stride_htd, stride_wtv, stride_wtd,
    stride_dhn, stride_dhd, stride_dwv, stride_dwd,
    N, V, DS, DT, invt_ptr,
    HAS_REV: tl.constexpr, HAS_TID: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_S: tl.constexpr, DOT_T: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    # coeff is [3, N]: forward KL, reverse KL, TIDAL, already divided by T.
    c_f = tl.load(coeff_ptr + rows, mask=row_ok, other=0.0)
    c_r = tl.load(coeff_ptr + N + rows, mask=row_ok, other=0.0)
    c_t = tl.load(coeff_ptr + 2 * N + rows, mask=row_ok, other=0.0)
    if tl.max(tl.abs(c_f) + tl.abs(c_r) + tl.abs(c_t), axis=0) > 0:
        rows64 = rows.to(tl.int64)
        inv_t = tl.load(invt_ptr)
        cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        cols64 = cols.to(tl.int64)
        lse_a = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        lse_b = tl.load(lse_ptr + N + rows, mask=row_ok, other=0.0)
        a = logits_tile(hs_ptr, ws_ptr, rows64, cols64, row_ok, col_ok, stride_hsn, stride_hsd, stride_wsv,
                        stride_wsd, DS, BLOCK_N, BLOCK_V, BLOCK_D, ACC_DTYPE, DOT_S) * inv_t
        b = logits_tile(ht_ptr, wt_ptr, rows64, cols64, row_ok, col_ok, stride_htn, stride_htd, stride_wtv,
                        stride_wtd, DT, BLOCK_N, BLOCK_V, BLOCK_D, ACC_DTYPE, DOT_T) * inv_t
        p_s = tl.exp(a - lse_a[:, None])
        dz = (c_f + c_t)[:, None] * p_s - c_f[:, None] * tl.exp(b - lse_b[:, None])
        if HAS_REV:
            d_rev = tl.load(div_ptr + N + rows, mask=row_ok, other=0.0)
            dz += c_r[:, None] * p_s * (a - b + (lse_b - lse_a - d_rev)[:, None])
        if HAS_TID:
            lam = tl.load(lam_ptr + rows, mask=row_ok, other=0.0)
            lse_c = tl.load(lse_ptr + 2 * N + rows, mask=row_ok, other=0.0)
            dz -= c_t[:, None] * tl.exp(a + lam[:, None] * (b - a) - lse_c[:, None])
        dz = tl.where(row_ok[:, None] & col_ok[None, :], dz, 0.0)
        offs_d = tl.arange(0, BLOCK_D)
        for d0 in range(0, DS, BLOCK_D):
            d = d0 + offs_d
            d_ok = d < DS
            if NEED_DH:
                w = tl.load(ws_ptr + cols64[:, None] * stride_wsv + d[None, :] * stride_wsd,
                            mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                dh = tl.dot(dz.to(w.dtype), w, input_precision=DOT_S, out_dtype=ACC_DTYPE)
                tl.atomic_add(dh_ptr + rows64[:, None] * stride_dhn + d[None, :] * stride_dhd, dh,
                              mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")
            if NEED_DW:
                h = tl.load(hs_ptr + rows64[:, None] * stride_hsn + d[None, :] * stride_hsd,
                            mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                dw = tl.dot(tl.trans(dz.to(h.dtype)), h, input_precision=DOT_S, out_dtype=ACC_DTYPE)
                tl.atomic_add(dw_ptr + cols64[:, None] * stride_dwv + d[None, :] * stride_dwd, dw,
                              mask=col_ok[:, None] & d_ok[None, :], sem="relaxed")


def _inv_t(temperature: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """1/T as a one-element tensor: a Python float argument would reach the kernel as fp32, even in fp64 runs."""
    return torch.full((1,), 1.0 / temperature, dtype=dtype, device=device)


def _common_args(s_hidden_ND, s_weight_VD, t_hidden_NE, t_weight_VE):
    acc_dtype, tl_acc, dot_s = compute_dtypes(s_hidden_ND.dtype)
    dot_t = compute_dtypes(t_hidden_NE.dtype)[2]
    strides = (*s_hidden_ND.stride(), *s_weight_VD.stride(), *t_hidden_NE.stride(), *t_weight_VE.stride())
    return acc_dtype, tl_acc, dot_s, dot_t, strides


def divergence_stats(
    s_hidden_ND: torch.Tensor,
    s_weight_VD: torch.Tensor,
    t_hidden_NE: torch.Tensor,
    t_weight_VE: torch.Tensor,
    lam_N: torch.Tensor,
    *,
    temperature: float,
    has_rev: bool,
    has_tid: bool,
    block_config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the statistics kernel: ``(lse [3, N], div [3, N])`` in the accumulator dtype; the reverse-KL
    and TIDAL rows are 0 unless ``has_rev`` / ``has_tid``. Inputs are checked by the op."""
    n = s_hidden_ND.shape[0]
    acc_dtype, tl_acc, dot_s, dot_t, strides = _common_args(s_hidden_ND, s_weight_VD, t_hidden_NE, t_weight_VE)
    lse = torch.zeros(3, n, dtype=acc_dtype, device=s_hidden_ND.device)
    div = torch.zeros(3, n, dtype=acc_dtype, device=s_hidden_ND.device)
    if n == 0:
        return lse, div
    kernel, meta = pick_kernel(_stats_kernel, block_config)
    grid = lambda m: (triton.cdiv(n, m["BLOCK_N"]),)
    kernel[grid](
        s_hidden_ND, s_weight_VD, t_hidden_NE, t_weight_VE, lam_N, lse, div, *strides,
        n, s_weight_VD.shape[0], s_hidden_ND.shape[1], t_hidden_NE.shape[1], _inv_t(temperature, acc_dtype, lam_N.device),
        HAS_REV=has_rev, HAS_TID=has_tid, ACC_DTYPE=tl_acc, DOT_S=dot_s, DOT_T=dot_t, **meta,
    )
    return lse, div


def divergence_grad(
    s_hidden_ND: torch.Tensor,
    s_weight_VD: torch.Tensor,
    t_hidden_NE: torch.Tensor,
    t_weight_VE: torch.Tensor,
    lam_N: torch.Tensor,
    coeff_3N: torch.Tensor,
    lse_3N: torch.Tensor,
    div_3N: torch.Tensor,
    *,
    temperature: float,
    has_rev: bool,
    has_tid: bool,
    need_dh: bool = True,
    need_dw: bool = True,
    dw_out: torch.Tensor | None = None,
    block_config: dict[str, int] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Launch the gradient kernel: ``(dh [N, D_s], dW [V', D_s])`` of ``sum_n sum_k coeff[k, n] D_k[n]`` in the
    accumulator dtype; ``None`` for a gradient not asked for. ``coeff_3N`` is in the accumulator dtype; ``dw_out``
    (optional) is a zero ``[V', D_s]`` accumulator-dtype tensor that receives dW."""
    n, ds = s_hidden_ND.shape
    vocab = s_weight_VD.shape[0]
    acc_dtype, tl_acc, dot_s, dot_t, strides = _common_args(s_hidden_ND, s_weight_VD, t_hidden_NE, t_weight_VE)
    dh = torch.zeros((n, ds), dtype=acc_dtype, device=s_hidden_ND.device) if need_dh else None
    dw = None
    if need_dw:
        dw = dw_out if dw_out is not None else torch.zeros((vocab, ds), dtype=acc_dtype, device=s_hidden_ND.device)
    if n == 0 or not (need_dh or need_dw):
        return dh, dw
    dummy = torch.zeros((1, 1), dtype=acc_dtype, device=s_hidden_ND.device)  # never written (constexpr flags)
    dh_arg = dh if dh is not None else dummy
    dw_arg = dw if dw is not None else dummy
    kernel, meta = pick_kernel(_grad_kernel, block_config)
    grid = lambda m: (triton.cdiv(n, m["BLOCK_N"]), triton.cdiv(vocab, m["BLOCK_V"]))
    kernel[grid](
        s_hidden_ND, s_weight_VD, t_hidden_NE, t_weight_VE, lam_N, (coeff_3N / temperature).contiguous(),
        lse_3N, div_3N, dh_arg, dw_arg, *strides, *dh_arg.stride(), *dw_arg.stride(),
        n, vocab, ds, t_hidden_NE.shape[1], _inv_t(temperature, acc_dtype, lam_N.device),
        HAS_REV=has_rev, HAS_TID=has_tid, NEED_DH=need_dh, NEED_DW=need_dw,
        ACC_DTYPE=tl_acc, DOT_S=dot_s, DOT_T=dot_t, **meta,
    )
    return dh, dw
