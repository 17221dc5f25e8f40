"""Pipeline B's token terms from the teacher's hidden rows and head (tide_ds.losses.token_divergence) against
today's path: the teacher's row logits, then the LM-head-fused student divergence (float64)."""

import pytest
import torch

from tide_ds.losses.fused_divergence import DivergenceTerm, fused_head_divergence
from tide_ds.losses.token_divergence import token_divergences

TERMS = {
    "kl": (DivergenceTerm("kl", "forward"),),
    "kl_rev": (DivergenceTerm("kl_rev", "reverse", 0.7),),
    "tidal": (DivergenceTerm("tidal", "tidal"),),
    "tidal+kl": (DivergenceTerm("tidal", "tidal", 1.3), DivergenceTerm("kl", "forward", 0.4)),
    "all": (DivergenceTerm("kl", "forward", 0.5), DivergenceTerm("kl_rev", "reverse", 0.7), DivergenceTerm("tidal", "tidal", 1.1)),
}
IMPLS = ("pytorch", "triton")


def _inputs(n, ds, dt, v, vt, *, seed, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    sh = (scale * torch.randn(n, ds, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    sw = (0.5 * torch.randn(v, ds, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    th = (scale * torch.randn(n, dt, generator=g, dtype=torch.float64)).to(dtype)
    tw = (0.5 * torch.randn(vt, dt, generator=g, dtype=torch.float64)).to(dtype)
    sel = torch.rand(n, generator=g) < 0.6
    lam = torch.rand(n, generator=g, dtype=torch.float64)
    omega = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    return sh, sw, th, tw, sel, lam, omega


def _run(fn, sh, sw):
    sh.grad = sw.grad = None
    total, values = fn()
    (1.7 * total).backward()
    return total.detach(), {k: v.detach() for k, v in values.items()}, sh.grad.clone(), sw.grad.clone()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", sorted(TERMS))
@pytest.mark.parametrize("n,ds,dt,v,vt,vocab,temperature", [(1, 3, 5, 7, 8, 5, 2.0), (13, 8, 12, 41, 45, 37, 2.0),
                                                            (9, 5, 7, 23, 23, 23, 0.7)],
                         ids=["one-row", "shared-prefix", "full-vocab-T0.7"])
def test_matches_teacher_logits_path(impl, name, n, ds, dt, v, vt, vocab, temperature):
    terms = TERMS[name]
    sh, sw, th, tw, sel, lam, omega = _inputs(n, ds, dt, v, vt, seed=n * 31 + v)
    if n == 1:
        sel[:] = True
    teacher_logits = th @ tw[:vocab].t()
    ref = _run(lambda: fused_head_divergence(sh, sw, teacher_logits, sel, terms, temperature=temperature, lam_N=lam,
                                             omega_N=omega), sh, sw)
    out = _run(lambda: token_divergences(sh, sw, th, tw, sel, terms, temperature=temperature, shared_vocab_size=vocab,
                                         lam_N=lam, omega_N=omega, implementation=impl, chunk_rows=4), sh, sw)
    torch.testing.assert_close(out[0], ref[0], atol=1e-12, rtol=1e-10)
    assert out[1].keys() == ref[1].keys()
    for key in ref[1]:
        torch.testing.assert_close(out[1][key], ref[1][key], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(out[2], ref[2], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(out[3], ref[3], atol=1e-12, rtol=1e-10)
    assert torch.count_nonzero(out[3][vocab:]) == 0 and torch.count_nonzero(out[2][~sel]) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_no_selected_rows_is_zero_with_zero_gradient(impl):
    sh, sw, th, tw, _, lam, _ = _inputs(6, 4, 5, 9, 9, seed=1)
    total, values, dh, dw = _run(lambda: token_divergences(sh, sw, th, tw, torch.zeros(6, dtype=torch.bool), TERMS["all"],
                                                           temperature=2.0, lam_N=lam, implementation=impl), sh, sw)
    assert total.item() == 0.0 and all(v.item() == 0.0 for v in values.values())
    assert torch.count_nonzero(dh) == 0 and torch.count_nonzero(dw) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_teacher_equal_to_student_is_zero(impl):
    sh, sw, _, _, sel, lam, omega = _inputs(5, 4, 4, 11, 11, seed=2)
    total, values, dh, dw = _run(lambda: token_divergences(sh, sw, sh.detach(), sw.detach(), sel, TERMS["all"],
                                                           temperature=2.0, lam_N=lam, omega_N=omega, implementation=impl),
                                 sh, sw)
    assert abs(total.item()) < 1e-14 and dh.abs().max().item() < 1e-14 and dw.abs().max().item() < 1e-14


@pytest.mark.parametrize("impl", IMPLS)
def test_float32_extreme_logits_finite(impl):
    sh, sw, th, tw, _, lam, _ = _inputs(8, 16, 16, 50, 50, seed=3, scale=60.0, dtype=torch.float32)
    total, _, dh, dw = _run(lambda: token_divergences(sh, sw, th, tw, torch.ones(8, dtype=torch.bool), TERMS["all"],
                                                      temperature=2.0, lam_N=torch.full((8,), 0.5), implementation=impl),
                            sh, sw)
    assert torch.isfinite(total) and torch.isfinite(dh).all() and torch.isfinite(dw).all()


def test_rejects_bad_inputs():
    sh, sw, th, tw, sel, lam, _ = _inputs(4, 3, 5, 7, 9, seed=4)
    with pytest.raises(ValueError, match="different vocabularies"):
        token_divergences(sh, sw, th, tw, sel, TERMS["kl"], temperature=2.0)
    with pytest.raises(ValueError, match="needs lam_N"):
        token_divergences(sh, sw, th, tw, sel, TERMS["tidal"], temperature=2.0, shared_vocab_size=5)
    with pytest.raises(ValueError, match="selected rows"):
        token_divergences(sh, sw, th, tw, sel[:3], TERMS["kl"], temperature=2.0, shared_vocab_size=5)
    with pytest.raises(ValueError, match="V'=8"):
        token_divergences(sh, sw, th, tw, sel, TERMS["kl"], temperature=2.0, shared_vocab_size=8)
