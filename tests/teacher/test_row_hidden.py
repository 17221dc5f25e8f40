"""Pipeline B without logits: the teacher's hidden rows and head (a view) give what its row logits gave, on a
real tiny WeDLM teacher without DeepSpeed; the fused token divergences on them match today's path."""

import torch

from tide_ds.losses.fused_divergence import DivergenceTerm, fused_head_divergence
from tide_ds.losses.token_divergence import token_divergences
from tide_ds.models.teachers import get_family
from tide_ds.models.wedlm import write_tiny_wedlm_checkpoint
from tide_ds.teacher.engine import TeacherEngine, TeacherModule


def _teacher(tmp_path, vocab_limit):
    fam = get_family("wedlm")
    ckpt = write_tiny_wedlm_checkpoint(tmp_path / "t", seed=3)
    module = TeacherModule(fam.load(ckpt), fam, block_size=8, concat_order="x0_xt", vocab_limit=vocab_limit)
    return TeacherEngine(module, family=fam, mask_token_id=1008, report=None)


def _batch():
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 1000, (2, 16), generator=g)
    masked = torch.rand(2, 16, generator=g) < 0.6
    a = masked & (torch.rand(2, 16, generator=g) < 0.5)
    rows = torch.stack([torch.randperm(16, generator=g)[:6] for _ in range(2)])
    return clean, masked, a, masked & ~a, rows


def test_hidden_rows_through_the_head_view_are_the_row_logits(tmp_path):
    teacher = _teacher(tmp_path, vocab_limit=1000)
    clean, masked, a, b, rows = _batch()
    in_a = a.gather(1, rows)
    with teacher.head_weight() as w:
        full = teacher.family.lm_head_weight(teacher.engine.model)
        assert w.shape == (1000, full.shape[1]) and w.data_ptr() == full.data_ptr()  # a view, not a copy
        assert not w.requires_grad
        single = teacher.row_hidden(clean, masked, rows)
        merged = teacher.comp_demo_row_hidden(clean, a, b, rows, in_a)
        assert single.shape == (2, 6, full.shape[1]) and single.dtype == full.dtype
        torch.testing.assert_close(single.float() @ w.float().t(), teacher.row_logits(clean, masked, rows))
        # CompDemo merged before the head (one head sweep) = merged after it (two sets of logits)
        torch.testing.assert_close(merged.float() @ w.float().t(), teacher.comp_demo_row_logits(clean, a, b, rows, in_a))


def test_token_terms_from_hidden_rows_match_the_row_logits_path(tmp_path):
    teacher = _teacher(tmp_path, vocab_limit=1000)
    clean, masked, a, b, rows = _batch()
    in_a = a.gather(1, rows)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(12, 24, generator=g, requires_grad=True)
    w = (0.3 * torch.randn(1024, 24, generator=g)).requires_grad_()
    selected = masked.gather(1, rows).flatten()
    lam, omega = torch.rand(12, generator=g), torch.rand(12, generator=g) + 0.5
    terms = (DivergenceTerm("tidal", "tidal", 1.0), DivergenceTerm("kl", "forward", 0.5), DivergenceTerm("kl_rev", "reverse", 0.3))
    logits = teacher.comp_demo_row_logits(clean, a, b, rows, in_a).flatten(0, 1)
    ref, ref_values = fused_head_divergence(h, w, logits, selected, terms, temperature=2.0, lam_N=lam, omega_N=omega)
    ref.backward()
    ref_grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    with teacher.head_weight() as t_weight:
        hidden = teacher.comp_demo_row_hidden(clean, a, b, rows, in_a).flatten(0, 1)
        total, values = token_divergences(h, w, hidden, t_weight, selected, terms, temperature=2.0,
                                          shared_vocab_size=t_weight.shape[0], lam_N=lam, omega_N=omega,
                                          implementation="pytorch")
    total.backward()
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-6)
    for key in ref_values:
        torch.testing.assert_close(values[key], ref_values[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, ref_grads[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad, ref_grads[1], rtol=1e-4, atol=1e-6)
