import pytest
import torch

from tide_ds.losses.diffusion_ce import fused_linear_masked_ce, masked_diffusion_ce_reference


def _inputs(n, d, v, *, dtype, seed=0, zero_frac=0.4):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = (0.5 * torch.randn(v, d, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    c = torch.rand(n, generator=g, dtype=torch.float64)
    c[torch.rand(n, generator=g) < zero_frac] = 0.0
    return h, w, y, c.to(torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("n,d,v,chunk", [(1, 3, 5, 0), (37, 8, 101, 4), (64, 16, 1009, 7), (13, 5, 4099, 1)])
def test_fused_ce_matches_reference_float64(n, d, v, chunk):
    h, w, y, c = _inputs(n, d, v, dtype=torch.float64)
    g_out = torch.tensor(1.7, dtype=torch.float64)
    loss, nll_sum = fused_linear_masked_ce(h, w, y, c, chunk_rows=chunk)
    (loss * g_out).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = masked_diffusion_ce_reference(h @ w.t(), y, c)
    (ref * g_out).backward()
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(gh, h.grad, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(gw, w.grad, atol=1e-12, rtol=1e-10)
    logp = torch.log_softmax(h.detach() @ w.detach().t(), -1)
    expect_nll = -(logp.gather(-1, y[:, None])[:, 0] * (c != 0)).sum()
    torch.testing.assert_close(nll_sum, expect_nll)


def test_fused_ce_hand_value():
    # one row, logits (2, 1, 0) through the identity head, target 0: CE = log(e^2+e+1) - 2
    h = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    w = torch.eye(3, dtype=torch.float64)
    loss, _ = fused_linear_masked_ce(h, w, torch.tensor([0]), torch.tensor([0.5], dtype=torch.float64))
    assert loss.item() == pytest.approx(0.5 * 0.40760596444438, rel=1e-12)


def test_fused_ce_float32_and_no_grad_path():
    h, w, y, c = _inputs(50, 16, 777, dtype=torch.float32, seed=3)
    with torch.no_grad():
        loss, _ = fused_linear_masked_ce(h, w, y, c, chunk_rows=8)
    ref = masked_diffusion_ce_reference(h.double() @ w.double().t(), y, c.double())
    assert abs(loss.item() - ref.item()) < 1e-4 * max(1.0, abs(ref.item()))


def test_fused_ce_all_rows_ignored_gives_zero_loss_and_grad():
    h, w, y, c = _inputs(9, 4, 31, dtype=torch.float64)
    loss, nll_sum = fused_linear_masked_ce(h, w, y, torch.zeros_like(c))
    loss.backward()
    assert loss.item() == 0.0 and nll_sum.item() == 0.0
    assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0


def test_fused_ce_rejects_bad_shapes():
    with pytest.raises(ValueError, match="equal D"):
        fused_linear_masked_ce(torch.zeros(2, 3), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long), torch.zeros(2))
    with pytest.raises(ValueError, match=r"\[N\]"):
        fused_linear_masked_ce(torch.zeros(2, 3), torch.zeros(5, 3), torch.zeros(3, dtype=torch.long), torch.zeros(2))


def test_fused_ce_gradcheck():
    h, w, y, c = _inputs(5, 3, 11, dtype=torch.float64, seed=7)
    assert torch.autograd.gradcheck(lambda a, b: fused_linear_masked_ce(a, b, y, c, chunk_rows=2)[0], (h, w))
