"""Tiled PyTorch implementation of the fused token divergences (rows x vocabulary tiles, two sweeps).

Legend: N rows, V' shared vocabulary prefix, D_s / D_t student / teacher hidden size.
``a = h_s W_s^T / T`` and ``b = h_t W_t^T / T`` are the tempered student and teacher logits of a row,
``c = (1 - lambda) a + lambda b`` the TIDAL mix; ``P_S``, ``P_T``, ``r`` their softmaxes.

Per row (docs/method.md §6, §7.3), with ``lse_x`` the log-sum-exp of ``x`` over V':

* forward KL  ``KL(P_T || P_S) = E_{P_T}[b - a] - lse_b + lse_a``, ``dD/da = P_S - P_T``;
* reverse KL  ``KL(P_S || P_T) = E_{P_S}[a - b] - lse_a + lse_b``, ``dD/da = P_S (a - b - lse_a + lse_b - D)``;
* TIDAL       ``KL(r || P_S)   = E_r[c - a] - lse_c + lse_a``,     ``dD/da = P_S - r`` (r detached).

Sweep 1 visits the vocabulary tile by tile and keeps, per row and per distribution, a running maximum,
the rescaled sum of exponentials and the rescaled expectation (online log-sum-exp, the expectation rides
along with the same rescaling), so ``lse_a``, ``lse_b``, ``lse_c`` and the three divergences come out of one
sweep. Sweep 2 recomputes both logit tiles, forms ``dL/dz_s`` of the tile from the per-row statistics and
the per-row coefficients, and adds ``dz W_s`` into ``dh`` and ``dz^T h_s`` into ``dW``. No ``[N, V']``
tensor exists on either side, and no head is converted as a whole: only one ``[vocab tile, D]`` slice at a
time when the head's dtype is not the accumulator's.
"""

from __future__ import annotations

import torch

__all__ = ["VOCAB_TILE", "auto_row_tile", "divergence_sweeps_pytorch"]

#: Vocabulary columns per tile of the PyTorch path.
VOCAB_TILE = 4096
#: Elements of one ``[rows, VOCAB_TILE]`` tile (2 Mi elements = 8 MiB in float32).
TILE_ELEMENTS = 2 * 1024 * 1024


def auto_row_tile(vocab_tile: int = VOCAB_TILE) -> int:
    """Rows per tile so that one ``[rows, vocab_tile]`` tile holds about :data:`TILE_ELEMENTS` elements."""
    return max(16, TILE_ELEMENTS // max(1, vocab_tile))


def accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


class _Online:
    """Running ``(max m, sum exp(x - m), sum exp(x - m) y)`` per row: log-sum-exp and ``E_softmax(x)[y]``."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device) -> None:
        self.m = torch.full((n,), float("-inf"), dtype=dtype, device=device)
        self.s = torch.zeros(n, dtype=dtype, device=device)
        self.u = torch.zeros(n, dtype=dtype, device=device)

    def update(self, x: torch.Tensor, y: torch.Tensor | None = None, *, sign: float = 1.0) -> None:
        """One tile: ``x [n, v]`` and, when the expectation is wanted, ``y`` (times ``sign``)."""
        m_new = torch.maximum(self.m, x.amax(dim=1))
        scale = torch.exp(self.m - m_new)
        e = torch.exp(x - m_new[:, None])
        self.s = self.s * scale + e.sum(1)
        if y is not None:  # a row-wise dot product, no [n, v] product tensor
            dot = torch.bmm(e.unsqueeze(1), y.unsqueeze(2)).view(-1)
            self.u = self.u * scale + (dot if sign == 1.0 else -dot)
        self.m = m_new

    def lse(self) -> torch.Tensor:
        return self.m + torch.log(self.s)

    def mean(self) -> torch.Tensor:
        return self.u / self.s


def _row_tiles(n: int, rows_N: torch.Tensor | None, chunk: int):
    if rows_N is None:
        return [slice(s, s + chunk) for s in range(0, n, chunk)]
    index = torch.nonzero(rows_N, as_tuple=True)[0]
    return [index[s : s + chunk] for s in range(0, index.numel(), chunk)]


def _logits(h: torch.Tensor, weight: torch.Tensor, v0: int, v1: int, acc: torch.dtype, inv_t: float) -> torch.Tensor:
    w = weight[v0:v1]
    return (h @ (w if w.dtype == acc else w.to(acc)).t()) * inv_t


def divergence_sweeps_pytorch(
    s_hidden_ND: torch.Tensor,
    s_weight_VD: torch.Tensor,
    t_hidden_NE: torch.Tensor,
    t_weight_VE: torch.Tensor,
    coeff_N3: torch.Tensor,
    lam_N: torch.Tensor,
    *,
    temperature: float,
    rows_N: torch.Tensor | None = None,
    need_dh: bool = True,
    need_dw: bool = True,
    dw_out: torch.Tensor | None = None,
    chunk_rows: int = 0,
    vocab_tile: int = VOCAB_TILE,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-row divergences and the student's gradients of ``sum_n sum_k coeff[n, k] D_k[n]``.

    Args:
        s_hidden_ND, s_weight_VD: student rows and head, the head already cut to the shared prefix V'
            (a view: ``W[:V']``).
        t_hidden_NE, t_weight_VE: teacher rows and head on the same prefix; constants.
        coeff_N3: per-row coefficients of (forward KL, reverse KL, TIDAL), accumulator dtype; a zero column
            skips that divergence's gradient, a row of zeros skips the row's gradient.
        lam_N: TIDAL's per-row lambda (accumulator dtype).
        temperature: T.
        rows_N: bool ``[N]``: compute only these rows (the others get D = 0 and no gradient); None = all.
        need_dh, need_dw: which gradients to form.
        dw_out: a zero ``[V', D_s]`` accumulator-dtype tensor (a view of the full head's gradient) that receives
            dW; None allocates one.
        chunk_rows: rows per tile (0: :func:`auto_row_tile`); vocab_tile: vocabulary columns per tile.

    Returns:
        ``(D [N, 3], dh [N, D_s] | None, dW [V', D_s] | None)`` in the accumulator dtype (float32, float64 for
        float64 student rows).
    """
    acc = accumulation_dtype(s_hidden_ND)
    n, vocab = s_hidden_ND.shape[0], s_weight_VD.shape[0]
    device = s_hidden_ND.device
    inv_t = 1.0 / temperature
    chunk = chunk_rows or auto_row_tile(vocab_tile)
    div = torch.zeros(n, 3, dtype=acc, device=device)
    dh = torch.zeros(n, s_hidden_ND.shape[1], dtype=acc, device=device) if need_dh else None
    dw = None
    if need_dw:
        dw = dw_out if dw_out is not None else torch.zeros(vocab, s_hidden_ND.shape[1], dtype=acc, device=device)
    # Which divergences are asked for: skip the others' work on the CPU (where reading this is free).
    want_f, want_r, need_tidal = coeff_N3.ne(0).any(0).tolist() if device.type == "cpu" else [True, True, True]
    need_b = want_f or want_r
    for idx in _row_tiles(n, rows_N, chunk):
        hs = s_hidden_ND[idx].to(acc)
        ht = t_hidden_NE[idx].to(acc)
        lam = lam_N[idx].to(acc)[:, None]
        rows = hs.shape[0]
        p_s, p_t, p_r = (_Online(rows, acc, device) for _ in range(3))
        # Sweep 1: online log-sum-exp of a, b, c and the expectations of the divergences.
        for v0 in range(0, vocab, vocab_tile):
            v1 = min(vocab, v0 + vocab_tile)
            a = _logits(hs, s_weight_VD, v0, v1, acc, inv_t)
            b = _logits(ht, t_weight_VE, v0, v1, acc, inv_t)
            diff = a - b if need_b else None
            p_s.update(a, diff if want_r else None)
            if need_b:
                p_t.update(b, diff if want_f else None, sign=-1.0)
            if need_tidal:
                c = torch.lerp(a, b, lam)
                p_r.update(c, c - a)
        zeros = torch.zeros_like(p_s.s)
        lse_a = p_s.lse()
        lse_b = p_t.lse() if need_b else zeros
        d_fwd = p_t.mean() - lse_b + lse_a if want_f else zeros
        d_rev = p_s.mean() - lse_a + lse_b if want_r else zeros
        lse_c = p_r.lse() if need_tidal else zeros
        d_tid = p_r.mean() - lse_c + lse_a if need_tidal else zeros
        div[idx] = torch.stack((d_fwd, d_rev, d_tid), dim=1)
        if not (need_dh or need_dw):
            continue
        # Sweep 2: dL/dz_s = (1/T) [(c_f + c_t) P_S - c_f P_T - c_t r + c_r P_S (a - b - lse_a + lse_b - D_rev)].
        cf, cr, ct = (coeff_N3[idx, k].to(acc)[:, None] * inv_t for k in range(3))
        shift = (lse_b - lse_a - d_rev)[:, None]
        gh = torch.zeros(rows, s_hidden_ND.shape[1], dtype=acc, device=device) if need_dh else None
        for v0 in range(0, vocab, vocab_tile):
            v1 = min(vocab, v0 + vocab_tile)
            a = _logits(hs, s_weight_VD, v0, v1, acc, inv_t)
            b = _logits(ht, t_weight_VE, v0, v1, acc, inv_t)
            ps = torch.exp(a - lse_a[:, None])
            dz = (cf + ct) * ps
            if want_f:
                dz -= cf * torch.exp(b - lse_b[:, None])
            if want_r:
                dz += cr * ps * (a - b + shift)
            if need_tidal:
                dz -= ct * torch.exp(torch.lerp(a, b, lam) - lse_c[:, None])
            w = s_weight_VD[v0:v1]
            w = w if w.dtype == acc else w.to(acc)
            if need_dh:
                gh.addmm_(dz, w)
            if need_dw:
                dw[v0:v1].addmm_(dz.t(), hs)
        if need_dh:
            dh[idx] = gh
    return div, dh, dw
