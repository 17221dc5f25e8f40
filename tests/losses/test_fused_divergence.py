"""The LM-head-fused token divergences against the materialised-logits losses (float64, autograd)."""

import pytest
import torch

from tide_ds.losses.fused_divergence import DivergenceTerm, fused_head_divergence
from tide_ds.losses.kl import token_kl
from tide_ds.losses.tidal import token_tidal


def _inputs(n, d, v, vocab, *, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = (scale * torch.randn(n, d, generator=g, dtype=torch.float64)).requires_grad_()
    w = (0.5 * torch.randn(v, d, generator=g, dtype=torch.float64)).requires_grad_()
    zt = 2.0 * torch.randn(n, vocab, generator=g, dtype=torch.float64)
    sel = torch.rand(n, generator=g) < 0.6
    lam = torch.rand(n, generator=g, dtype=torch.float64)
    omega = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    return h, w, zt, sel, lam, omega


def _reference(h, w, zt, sel, lam, omega, terms, temperature, vocab):
    """Materialise the student logits of the selected rows, then the spec's row losses with autograd."""
    zs = h[sel] @ w.t()
    values = {}
    for term in terms:
        if term.kind == "tidal":
            values[term.name] = token_tidal(zs, zt[sel], lam[sel], temperature=temperature, shared_vocab_size=vocab,
                                            weight_N=omega[sel])
        else:
            values[term.name] = token_kl(zs, zt[sel], temperature=temperature, shared_vocab_size=vocab,
                                         reverse=term.kind == "reverse")
    return sum(term.weight * values[term.name] for term in terms), values


TERMS = {
    "kl": (DivergenceTerm("kl", "forward"),),
    "kl_rev": (DivergenceTerm("kl_rev", "reverse", 0.7),),
    "tidal": (DivergenceTerm("tidal", "tidal"),),
    "tidal+kl": (DivergenceTerm("tidal", "tidal", 1.3), DivergenceTerm("kl", "forward", 0.4)),
}


@pytest.mark.parametrize("name", sorted(TERMS))
@pytest.mark.parametrize("n,d,v,vocab,chunk,temperature", [(1, 3, 7, 5, 0, 2.0), (13, 8, 41, 37, 4, 2.0), (9, 5, 23, 23, 2, 0.7)],
                         ids=["one-row", "sliced-tiles", "full-vocab"])
def test_fused_divergence_matches_materialised_float64(name, n, d, v, vocab, chunk, temperature):
    terms = TERMS[name]
    h, w, zt, sel, lam, omega = _inputs(n, d, v, vocab, seed=n * 31 + v)
    if n == 1:
        sel[:] = True
    total, values = fused_head_divergence(h, w, zt, sel, terms, temperature=temperature, lam_N=lam, omega_N=omega,
                                          chunk_rows=chunk)
    (1.7 * total).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref_total, ref_values = _reference(h, w, zt, sel, lam, omega, terms, temperature, vocab)
    (1.7 * ref_total).backward()
    torch.testing.assert_close(total, ref_total, atol=1e-12, rtol=1e-11)
    for key in values:
        torch.testing.assert_close(values[key], ref_values[key].detach(), atol=1e-12, rtol=1e-11)
    torch.testing.assert_close(gh, h.grad, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(gw, w.grad, atol=1e-12, rtol=1e-10)
    assert torch.count_nonzero(gw[vocab:]) == 0  # columns beyond the shared prefix get no gradient
    assert torch.count_nonzero(gh[~sel]) == 0  # unselected rows neither


def test_fused_divergence_no_selected_rows_is_zero_with_zero_gradient():
    h, w, zt, sel, lam, omega = _inputs(6, 4, 9, 9, seed=1)
    total, values = fused_head_divergence(h, w, zt, torch.zeros(6, dtype=torch.bool), TERMS["tidal+kl"],
                                          temperature=2.0, lam_N=lam)
    total.backward()
    assert total.item() == 0.0 and all(v.item() == 0.0 for v in values.values())
    assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0


def test_fused_divergence_teacher_equal_to_student_is_zero():
    h, w, _, sel, lam, omega = _inputs(5, 4, 11, 11, seed=2)
    zt = (h @ w.t()).detach()
    total, values = fused_head_divergence(h, w, zt, sel, TERMS["kl"] + TERMS["kl_rev"] + TERMS["tidal"],
                                          temperature=2.0, lam_N=lam, omega_N=omega)
    total.backward()
    assert abs(total.item()) < 1e-14
    assert h.grad.abs().max().item() < 1e-14


def test_fused_divergence_float32_extreme_logits_finite():
    g = torch.Generator().manual_seed(3)
    h = (60.0 * torch.randn(8, 6, generator=g)).requires_grad_()
    w = torch.randn(50, 6, generator=g).requires_grad_()
    zt = 300.0 * torch.randn(8, 40, generator=g)
    total, _ = fused_head_divergence(h, w, zt, torch.ones(8, dtype=torch.bool), TERMS["tidal+kl"] + TERMS["kl_rev"],
                                     temperature=2.0, lam_N=torch.full((8,), 0.5))
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()


def test_fused_divergence_rejects_bad_shapes():
    h, w, zt, sel, lam, _ = _inputs(4, 3, 7, 5, seed=4)
    with pytest.raises(ValueError, match="V' <= the student's vocabulary"):
        fused_head_divergence(h, w, torch.zeros(4, 9, dtype=torch.float64), sel, TERMS["kl"], temperature=2.0)
    with pytest.raises(ValueError, match="needs lam_N"):
        fused_head_divergence(h, w, zt, sel, TERMS["tidal"], temperature=2.0)
    with pytest.raises(ValueError, match="selected rows"):
        fused_head_divergence(h, w, zt, sel[:3], TERMS["kl"], temperature=2.0)
