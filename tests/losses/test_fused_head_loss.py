import pytest
import torch

from tide_ds.losses.calm import calm_loss, chunk_sums
from tide_ds.losses.diffusion_ce import fused_linear_masked_ce
from tide_ds.losses.fused_head import fused_head_loss


def _inputs(n=23, d=6, v=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = (0.7 * torch.randn(v, d, generator=g, dtype=torch.float64)).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    rows = torch.rand(n, generator=g) < 0.6
    return h, w, y, rows


def test_ce_through_fused_head_equals_fused_ce():
    h, w, y, rows = _inputs()
    c = rows.double() * 0.3
    loss, lp, terms = fused_head_loss(h, w, y, rows, lambda lp: ((-(c * lp).sum()), {"ce": -(c * lp).sum()}), chunk_rows=4)
    (2.0 * loss).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref, _ = fused_linear_masked_ce(h, w, y, c)
    (2.0 * ref).backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(terms["ce"], ref.detach())
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, w.grad)
    assert torch.all(lp[~rows] == 0)


@pytest.mark.parametrize("reverse", [False, True])
def test_ce_plus_calm_matches_autograd_on_full_logits(reverse):
    h, w, y, rows = _inputs(seed=3)
    chunk_ids = torch.tensor([i // 3 if r else -1 for i, r in enumerate(rows.tolist())]).view(1, -1)
    n_chunks = int(chunk_ids.max()) + 1
    teacher_ll = -torch.rand(1, n_chunks, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 4
    active = torch.ones(1, n_chunks, dtype=torch.bool)
    active[0, 1] = False
    c = rows.double() / rows.sum()

    def loss_fn(lp):
        ce = -(c * lp).sum()
        ll = chunk_sums(lp.view(1, -1), chunk_ids, n_chunks)
        calm = calm_loss(ll, teacher_ll, active, temperature=2.0, reverse=reverse)
        return ce + 0.5 * calm, {"ce": ce, "calm": calm}

    loss, _, terms = fused_head_loss(h, w, y, rows, loss_fn, chunk_rows=5)
    loss.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    lp_full = torch.log_softmax(h @ w.t(), -1).gather(-1, y[:, None])[:, 0] * rows
    ref, ref_terms = loss_fn(lp_full)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(terms["calm"], ref_terms["calm"].detach())
    torch.testing.assert_close(gh, h.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gw, w.grad, rtol=1e-9, atol=1e-12)


def test_fused_head_gradcheck():
    h, w, y, rows = _inputs(n=5, d=3, v=11, seed=2)
    c = rows.double()
    assert torch.autograd.gradcheck(
        lambda a, b: fused_head_loss(a, b, y, rows, lambda lp: (-(c * lp).sum() + (lp**2).sum(), {}), chunk_rows=2)[0],
        (h, w),
    )
