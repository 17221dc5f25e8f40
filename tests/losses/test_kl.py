import pytest
import torch

from tide_ds.losses.kl import token_kl


def kl_naive(zs, zt, *, temperature, vocab, reverse):
    """The docs/method.md §6 formula with autograd: slice, log-softmax, per-row KL, T^2 * mean."""
    ls = torch.log_softmax(zs[:, :vocab] / temperature, -1)
    lt = torch.log_softmax(zt[:, :vocab] / temperature, -1)
    kl = (ls.exp() * (ls - lt)).sum(-1) if reverse else (lt.exp() * (lt - ls)).sum(-1)
    return temperature**2 * kl.sum() / max(1, zs.shape[0])


def _logits(n, v_s, v_t, *, seed, scale=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    zs = (scale * torch.randn(n, v_s, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    zt = (scale * torch.randn(n, v_t, generator=g, dtype=torch.float64)).to(dtype)
    return zs, zt


APPENDIX_ZS = [[2.0, 1.0, 0.0]]
APPENDIX_ZT = [[0.0, 2.0, 1.0]]


@pytest.mark.parametrize("reverse,expected", [(False, 0.882058), (True, 1.038882)], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_token_kl_appendix_c(reverse, expected, dtype):
    zs = torch.tensor(APPENDIX_ZS, dtype=dtype)
    zt = torch.tensor(APPENDIX_ZT, dtype=dtype)
    loss = token_kl(zs, zt, temperature=2.0, reverse=reverse)
    assert loss.dtype == dtype
    assert loss.item() == pytest.approx(expected, abs=2e-6)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize(
    "n,v_s,v_t,vocab,temperature,chunk",
    [(1, 3, 3, 3, 1.0, 0), (7, 41, 37, 31, 2.0, 3), (16, 101, 113, 97, 0.7, 5), (5, 13, 13, 13, 5.0, 1)],
    ids=["one-row", "odd-sliced", "multi-tile", "T5-row-tiles"],
)
def test_token_kl_matches_autograd_float64(reverse, n, v_s, v_t, vocab, temperature, chunk):
    zs, zt = _logits(n, v_s, v_t, seed=n + v_s)
    g_out = torch.tensor(1.3, dtype=torch.float64)
    loss = token_kl(zs, zt, temperature=temperature, shared_vocab_size=vocab, reverse=reverse, chunk_rows=chunk)
    (loss * g_out).backward()
    grad = zs.grad.clone()
    zs.grad = None
    ref = kl_naive(zs, zt, temperature=temperature, vocab=vocab, reverse=reverse)
    (ref * g_out).backward()
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad, zs.grad, atol=1e-13, rtol=1e-10)
    assert torch.count_nonzero(grad[:, vocab:]) == 0


def test_token_kl_forward_gradient_is_T_times_prob_difference():
    zs, zt = _logits(6, 11, 11, seed=7)
    temperature = 2.0
    token_kl(zs, zt, temperature=temperature).backward()
    expected = temperature * (torch.softmax(zs.detach() / temperature, -1) - torch.softmax(zt / temperature, -1)) / 6
    torch.testing.assert_close(zs.grad, expected, atol=1e-14, rtol=1e-12)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_token_kl_gradcheck(reverse):
    zs, zt = _logits(3, 7, 6, seed=11)
    assert torch.autograd.gradcheck(
        lambda x: token_kl(x, zt, temperature=2.0, shared_vocab_size=5, reverse=reverse, chunk_rows=2), (zs,)
    )


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_token_kl_teacher_equals_student_is_zero(reverse):
    zs, _ = _logits(4, 17, 17, seed=3)
    teacher = torch.cat([zs.detach()[:, :12], torch.randn(4, 9, dtype=torch.float64)], dim=1)  # differs beyond V'
    loss = token_kl(zs, teacher, temperature=2.0, shared_vocab_size=12, reverse=reverse)
    loss.backward()
    assert abs(loss.item()) < 1e-14
    assert zs.grad.abs().max().item() < 1e-15


def test_token_kl_columns_beyond_shared_prefix_do_not_matter():
    zs, zt = _logits(5, 20, 25, seed=5)
    base = token_kl(zs, zt, temperature=2.0, shared_vocab_size=15)
    zs2 = zs.detach().clone()
    zt2 = zt.clone()
    zs2[:, 15:] += 100.0
    zt2[:, 15:] -= 100.0
    assert token_kl(zs2, zt2, temperature=2.0, shared_vocab_size=15).item() == pytest.approx(base.item(), rel=1e-14)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_token_kl_no_rows_is_zero(reverse):
    zs = torch.zeros(0, 9, dtype=torch.float32, requires_grad=True)
    loss = token_kl(zs, torch.zeros(0, 9), temperature=2.0, reverse=reverse)
    loss.backward()
    assert loss.item() == 0.0 and zs.grad.shape == (0, 9)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_token_kl_bf16_accumulates_in_float32(reverse):
    zs, zt = _logits(32, 257, 257, seed=2, dtype=torch.bfloat16)
    loss = token_kl(zs, zt, temperature=2.0, reverse=reverse, chunk_rows=7)
    loss.backward()
    ref = kl_naive(zs.detach().double(), zt.double(), temperature=2.0, vocab=257, reverse=reverse)
    assert loss.dtype == torch.float32 and zs.grad.dtype == torch.bfloat16
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_token_kl_extreme_logits_are_finite():
    zs = torch.tensor([[1e4, -1e4, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float32, requires_grad=True)
    zt = torch.tensor([[-1e4, 1e4, 0.0], [3e4, -3e4, 1.0]], dtype=torch.float32)
    for reverse in (False, True):
        loss = token_kl(zs, zt, temperature=1.0, reverse=reverse)
        (grad,) = torch.autograd.grad(loss, zs)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_token_kl_rejects_bad_inputs():
    with pytest.raises(ValueError, match="shared_vocab_size"):
        token_kl(torch.zeros(2, 5), torch.zeros(2, 6), temperature=2.0)
    with pytest.raises(ValueError, match=r"shared_vocab_size=7 must be in \[1, min\(V_s, V_t\)\] = \[1, 5\]"):
        token_kl(torch.zeros(2, 5), torch.zeros(2, 6), temperature=2.0, shared_vocab_size=7)
    with pytest.raises(ValueError, match="same N"):
        token_kl(torch.zeros(2, 5), torch.zeros(3, 5), temperature=2.0)
    with pytest.raises(ValueError, match="temperature"):
        token_kl(torch.zeros(2, 5), torch.zeros(2, 5), temperature=0.0)
