import math

import pytest
import torch

from tide_ds.losses.calm import (
    CHUNK_EPS,
    calm_loss,
    chunk_probs,
    chunk_sums,
    log1mexp,
    token_logprobs,
)

LOGIT_BOUND = math.log((1 - CHUNK_EPS) / CHUNK_EPS)  # 16.118..., the docs/method.md §5.4 bound of |logit(q)|


def _one(value, dtype=torch.float64, grad=False):
    return torch.tensor([[value]], dtype=dtype, requires_grad=grad)


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


def _chunk_inputs(b, c, *, seed, low=-8.0, high=-0.3, p_active=0.7):
    g = torch.Generator().manual_seed(seed)
    ls = (low + (high - low) * torch.rand(b, c, generator=g, dtype=torch.float64)).requires_grad_()
    lt = low + (high - low) * torch.rand(b, c, generator=g, dtype=torch.float64)
    active = torch.rand(b, c, generator=g) < p_active
    active[0, 0] = True
    return ls, lt, active


# ---- chunk sums and token log-probs


def test_chunk_sums_matches_dense_and_ignores_minus_one():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(3, 11, generator=g, dtype=torch.float64)
    ids = torch.randint(-1, 4, (3, 11), generator=g)
    ids[0] = -1  # a row of no chunk at all
    out = chunk_sums(values, ids, 5)
    dense = torch.stack([(values * (ids == c)).sum(1) for c in range(5)], dim=1)
    assert out.shape == (3, 5) and out.dtype == torch.float64
    torch.testing.assert_close(out, dense, atol=1e-15, rtol=0)
    assert torch.all(out[0] == 0) and torch.all(out[:, 4] == 0)  # chunk 4 has no tokens


def test_chunk_sums_gradient_and_teacher_length():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]], requires_grad=True)
    ids = torch.tensor([[1, -1, 0, 1, -1]])
    out = chunk_sums(values, ids, 2)
    assert out.tolist() == [[3.0, 5.0]]
    (out * torch.tensor([[10.0, 100.0]])).sum().backward()
    assert values.grad.tolist() == [[100.0, 0.0, 10.0, 100.0, 0.0]]


def test_chunk_sums_bf16_values_sum_in_float32():
    values = torch.full((1, 64), -1.0 / 3.0).to(torch.bfloat16)
    out = chunk_sums(values, torch.zeros(1, 64, dtype=torch.long), 1)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(64 * values[0, 0].float().item(), rel=1e-7)


def test_token_logprobs_is_gather_minus_logsumexp():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 17, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 17, (2, 5), generator=g)
    expected = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(token_logprobs(logits, targets), expected, atol=1e-14, rtol=0)
    assert token_logprobs(logits.to(torch.bfloat16), targets).dtype == torch.float32


# ---- docs/method.md Appendix C


def test_chunk_probs_appendix_c():
    s = chunk_probs(_one(-1.0), 2.0)
    q = chunk_probs(_one(-0.5), 2.0)
    assert s.item() == pytest.approx(0.606531, abs=1e-6) and q.item() == pytest.approx(0.778801, abs=1e-6)


@pytest.mark.parametrize(
    "reverse,loss_ref,grad_ref", [(False, 0.595724, -0.218912), (True, 0.745257, -0.381718)], ids=["calm", "reverse"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_calm_loss_appendix_c(reverse, loss_ref, grad_ref, dtype):
    ls = _one(-1.0, dtype, grad=True)
    loss = calm_loss(ls, _one(-0.5, dtype), _one(True, torch.bool), temperature=2.0, reverse=reverse)
    assert loss.dtype == dtype
    assert loss.item() == pytest.approx(loss_ref, abs=1e-6)
    assert _grad(loss, ls).item() == pytest.approx(grad_ref, abs=1e-6)


# ---- gradients


@pytest.mark.parametrize("reverse", [False, True], ids=["calm", "reverse"])
def test_calm_loss_gradcheck(reverse):
    ls, lt, active = _chunk_inputs(2, 3, seed=4)
    weight = torch.rand(2, 3, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(
        lambda x: calm_loss(x, lt, active, temperature=2.0, reverse=reverse, weight_BC=weight), (ls,)
    )


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
def test_calm_gradients_match_section_5_4(temperature):
    ls, lt, active = _chunk_inputs(4, 9, seed=int(temperature * 10))
    s = torch.exp(ls.detach() / temperature)
    q = torch.exp(lt / temperature)
    n_active = active.sum().item()
    fwd = _grad(calm_loss(ls, lt, active, temperature=temperature), ls)
    rev = _grad(calm_loss(ls, lt, active, temperature=temperature, reverse=True), ls)
    expected_fwd = (s - q) / (temperature * (1 - s)) * active / n_active
    expected_rev = -(s / temperature) * torch.log(q / (1 - q)) * active / n_active
    torch.testing.assert_close(fwd, expected_fwd, atol=1e-14, rtol=1e-11)
    torch.testing.assert_close(rev, expected_rev, atol=1e-14, rtol=1e-11)


def test_calm_token_level_backprop_gives_each_chunk_token_its_chunk_coefficient():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(1, 6, 11, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (1, 6), generator=g)
    ids = torch.tensor([[0, 0, -1, 1, 1, 1]])
    logp = token_logprobs(logits, targets)
    logp.retain_grad()
    ll_s = chunk_sums(logp, ids, 2)
    ll_s.retain_grad()
    loss = calm_loss(
        ll_s,
        torch.tensor([[-0.7, -3.0]], dtype=torch.float64),
        torch.ones(1, 2, dtype=torch.bool),
        temperature=2.0,
        reverse=True,
    )
    loss.backward()
    coeff = ll_s.grad[0]
    assert logp.grad[0].tolist() == [coeff[0].item()] * 2 + [0.0] + [coeff[1].item()] * 3
    # dlogp/dz = onehot - softmax (docs/method.md §5.4)
    onehot = torch.nn.functional.one_hot(targets, 11).double()
    expected = logp.grad[..., None] * (onehot - torch.softmax(logits.detach(), -1))
    torch.testing.assert_close(logits.grad, expected, atol=1e-15, rtol=1e-12)


EXTREME = [0.0, -1e-12, -1e-7, -1e-3, -0.5, -3.0, -40.0, -200.0, -1e4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
def test_reverse_calm_gradient_is_bounded_with_teacher_sign_on_extreme_inputs(dtype, temperature):
    ls_vals, lt_vals = torch.meshgrid(torch.tensor(EXTREME), torch.tensor(EXTREME), indexing="ij")
    ls = ls_vals.to(dtype).requires_grad_()
    lt = lt_vals.to(dtype)
    active = torch.ones_like(ls, dtype=torch.bool)
    loss = calm_loss(ls, lt, active, temperature=temperature, reverse=True)
    grad = _grad(loss, ls) * active.sum()  # per-chunk d B / d l^S
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    q = torch.exp(lt.double() / temperature).clamp(CHUNK_EPS, 1 - CHUNK_EPS)
    logit_q = torch.log(q) - torch.log1p(-q)
    bound = logit_q.abs().max().item() / temperature
    assert bound == pytest.approx(LOGIT_BOUND / temperature, rel=1e-6)
    assert grad.abs().max().item() <= bound * (1 + 1e-5)
    # The teacher sets the sign: push up (negative d loss / d l) iff q > 1/2; zero only where s underflows.
    s = torch.exp(ls.detach().double() / temperature)
    signed = grad.double() * torch.sign(logit_q)
    assert torch.all(signed <= 0)
    assert torch.all((signed < 0) | (s < 1e-30) | (logit_q.abs() < 1e-6))
    # and it is the docs/method.md §5.4 formula, even at l^S = 0 and l^S = -1e4
    torch.testing.assert_close(grad.double(), -(s / temperature) * logit_q, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_calm_is_finite_and_never_silently_zero_on_extreme_inputs(dtype):
    temperature = 2.0
    ls_vals, lt_vals = torch.meshgrid(torch.tensor(EXTREME), torch.tensor(EXTREME), indexing="ij")
    ls = ls_vals.to(dtype).requires_grad_()
    lt = lt_vals.to(dtype)
    active = torch.ones_like(ls, dtype=torch.bool)
    loss = calm_loss(ls, lt, active, temperature=temperature)
    grad = _grad(loss, ls) * active.sum()
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    q = torch.exp(lt.double() / temperature).clamp(CHUNK_EPS, 1 - CHUNK_EPS)
    # Far below the reference's clip (l^S < -32.2 at T=2) the coefficient is -q/T, not 0 (docs/method.md §15.6).
    far = ls_vals <= -40.0
    torch.testing.assert_close(grad.double()[far], (-q / temperature)[far], atol=1e-6, rtol=1e-5)
    # A certain student chunk (s -> 1) is pushed down with the capped slope unless the teacher is
    # certain too (q = 1 - eps): never zero, never inf.
    top = ls_vals >= -1e-7
    cap = (1 - CHUNK_EPS - q) / (temperature * CHUNK_EPS)
    unsure = top & (q < 0.999)
    assert torch.all(grad.double()[unsure] > 1e3)
    assert torch.all(grad.double()[top] <= cap[top] * (1 + 1e-3) + 1e-6)
    torch.testing.assert_close(grad.double()[top & (ls_vals == 0.0)], cap[top & (ls_vals == 0.0)], atol=1e-6, rtol=1e-3)


def test_log1mexp_is_accurate_on_both_branches():
    x = torch.tensor([-1e-20, -1e-8, -0.1, -0.6931, -0.6932, -5.0, -50.0, -1e4], dtype=torch.float64)
    expected = [math.log(-math.expm1(v)) if v > -0.7 else math.log1p(-math.exp(v)) for v in x.tolist()]
    torch.testing.assert_close(log1mexp(x), torch.tensor(expected, dtype=torch.float64), atol=0, rtol=1e-14)
    x32 = torch.tensor([-1e-7, -1e-3], requires_grad=True)
    y = log1mexp(x32)
    assert y[0].item() == pytest.approx(math.log(1e-7), rel=1e-6)  # log1p(-exp(x)) would give -inf
    (g,) = torch.autograd.grad(y.sum(), x32)
    assert torch.isfinite(g).all()


# ---- special cases


@pytest.mark.parametrize("reverse", [False, True], ids=["calm", "reverse"])
def test_calm_no_active_chunk_gives_zero_loss_and_grad(reverse):
    ls = torch.tensor([[float("nan"), 0.0, float("-inf")]], requires_grad=True)
    lt = torch.tensor([[float("-inf"), float("nan"), 0.0]])
    loss = calm_loss(ls, lt, torch.zeros(1, 3, dtype=torch.bool), temperature=2.0, reverse=reverse)
    loss.backward()
    assert loss.item() == 0.0
    assert ls.grad.tolist() == [[0.0, 0.0, 0.0]]


def test_calm_inactive_padding_does_not_leak_into_active_chunks():
    ls = torch.tensor([[-1.0, float("nan"), float("-inf")]], dtype=torch.float64, requires_grad=True)
    lt = torch.tensor([[-0.5, float("-inf"), float("nan")]], dtype=torch.float64)
    active = torch.tensor([[True, False, False]])
    for reverse, (loss_ref, grad_ref) in ((False, (0.595724, -0.218912)), (True, (0.745257, -0.381718))):
        loss = calm_loss(ls, lt, active, temperature=2.0, reverse=reverse)
        grad = _grad(loss, ls)
        assert loss.item() == pytest.approx(loss_ref, abs=1e-6)
        assert grad[0, 0].item() == pytest.approx(grad_ref, abs=1e-6) and grad[0, 1:].tolist() == [0.0, 0.0]


def test_forward_calm_teacher_equals_student_has_zero_gradient_and_entropy_loss():
    ls, _, active = _chunk_inputs(3, 5, seed=12)
    lt = ls.detach().clone()
    loss = calm_loss(ls, lt, active, temperature=2.0)
    q = torch.exp(lt / 2.0)
    entropy = -(q * torch.log(q) + (1 - q) * torch.log1p(-q))
    assert loss.item() == pytest.approx((entropy * active).sum().item() / active.sum().item(), rel=1e-12)
    assert _grad(loss, ls).abs().max().item() < 1e-15


def test_calm_normalises_by_active_count_and_weights_chunks():
    ls = torch.tensor([[-1.0, -1.0], [-1.0, -2.0]], dtype=torch.float64)
    lt = torch.full((2, 2), -0.5, dtype=torch.float64)
    active = torch.tensor([[True, False], [True, True]])
    one = calm_loss(ls[:1, :1], lt[:1, :1], active[:1, :1], temperature=2.0, reverse=True)
    other = calm_loss(ls[1:, 1:], lt[1:, 1:], active[1:, 1:], temperature=2.0, reverse=True)
    weight = torch.tensor([[2.0, 9.0], [1.0, 0.5]], dtype=torch.float64)
    loss = calm_loss(ls, lt, active, temperature=2.0, reverse=True, weight_BC=weight)
    assert loss.item() == pytest.approx((2 * one.item() + one.item() + 0.5 * other.item()) / 3, rel=1e-12)


def test_calm_rejects_bad_inputs():
    a = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"\[B, C\]"):
        calm_loss(torch.zeros(2, 3), torch.zeros(2, 4), a, temperature=2.0)
    with pytest.raises(TypeError, match="bool"):
        calm_loss(torch.zeros(2, 3), torch.zeros(2, 3), a.float(), temperature=2.0)
    with pytest.raises(ValueError, match="temperature"):
        calm_loss(torch.zeros(2, 3), torch.zeros(2, 3), a, temperature=-1.0)
    with pytest.raises(ValueError, match="same shape"):
        chunk_sums(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.long), 2)
