"""Forward masking and the per-token CE coefficients (docs/method.md §1.3–§1.4)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tide_ds.diffusion.masking import NORM_TYPES, WEIGHT_TYPES, loss_weight, mask_tokens, token_loss_weights
from tide_ds.diffusion.schedules import CosineSchedule, LinearSchedule

MASK = 99
LINEAR = LinearSchedule()


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _prompt_response_batch(b: int, length: int, prompt: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.arange(b * length, dtype=torch.long).reshape(b, length) % 50 + 1
    labels = ids.clone()
    labels[:, :prompt] = -100
    labels[:, length - pad :] = -100
    return ids, labels


# --- mask_tokens ------------------------------------------------------------------------------------


def test_mask_tokens_matches_formula() -> None:
    ids, labels = _prompt_response_batch(3, 10, prompt=2, pad=3)
    t = torch.tensor([0.2, 0.5, 0.9])
    x_t, masked = mask_tokens(ids, labels, t, schedule=LINEAR, mask_token_id=MASK, generator=_gen(7))
    u = torch.rand(3, 10, generator=_gen(7))
    expected = (u < t[:, None]) & (labels != -100)
    assert torch.equal(masked, expected)
    assert torch.equal(x_t, torch.where(expected, MASK, ids))
    assert x_t.dtype == torch.long and masked.dtype == torch.bool


def test_prompt_and_padding_never_masked() -> None:
    ids, labels = _prompt_response_batch(4, 16, prompt=3, pad=5)
    t = torch.ones(4)  # mask probability 1: every maskable token is masked
    x_t, masked = mask_tokens(ids, labels, t, schedule=LINEAR, mask_token_id=MASK, generator=_gen())
    maskable = labels != -100
    assert torch.equal(masked, maskable)
    assert torch.equal(x_t[~maskable], ids[~maskable])
    assert (x_t[maskable] == MASK).all()


def test_nothing_masked_at_t_zero() -> None:
    ids, labels = _prompt_response_batch(2, 8, prompt=1, pad=1)
    x_t, masked = mask_tokens(ids, labels, torch.zeros(2), schedule=LINEAR, mask_token_id=MASK, generator=_gen())
    assert not masked.any() and torch.equal(x_t, ids)


def test_int32_input_gives_int64_output() -> None:
    ids, labels = _prompt_response_batch(2, 8, prompt=1, pad=1)
    x_t, _ = mask_tokens(ids.int(), labels.int(), torch.ones(2), schedule=LINEAR, mask_token_id=MASK, generator=_gen())
    assert x_t.dtype == torch.long


@pytest.mark.parametrize("schedule", [LinearSchedule(), CosineSchedule()], ids=["linear", "cosine"])
def test_masking_rate_matches_schedule(schedule) -> None:
    n, length = 4, 40_000
    ids, labels = _prompt_response_batch(n, length, prompt=100, pad=length // 2)
    t = torch.tensor([0.05, 0.3, 0.5, 0.9])
    _, masked = mask_tokens(ids, labels, t, schedule=schedule, mask_token_id=MASK, generator=_gen(11))
    maskable = labels != -100
    n_maskable = maskable.sum(1).double()
    rate = masked.sum(1).double() / n_maskable
    p = schedule.mask_prob(t).double()
    # Binomial(n, p) rate: standard deviation sqrt(p (1 - p) / n); allow 5 of them.
    tol = 5 * torch.sqrt(p * (1 - p) / n_maskable)
    assert ((rate - p).abs() < tol).all(), (rate, p, tol)


def test_same_generator_state_same_mask() -> None:
    ids, labels = _prompt_response_batch(2, 64, prompt=4, pad=4)
    t = torch.tensor([0.5, 0.5])
    a = mask_tokens(ids, labels, t, schedule=LINEAR, mask_token_id=MASK, generator=_gen(3))
    b = mask_tokens(ids, labels, t, schedule=LINEAR, mask_token_id=MASK, generator=_gen(3))
    c = mask_tokens(ids, labels, t, schedule=LINEAR, mask_token_id=MASK, generator=_gen(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_mask_tokens_shape_errors() -> None:
    ids, labels = _prompt_response_batch(2, 8, prompt=1, pad=1)
    with pytest.raises(ValueError, match=r"same shape \[B, L\]"):
        mask_tokens(ids, labels[:, :4], torch.ones(2), schedule=LINEAR, mask_token_id=MASK, generator=_gen())
    with pytest.raises(ValueError, match=r"t of shape \[B\]=2; got \(3,\)"):
        mask_tokens(ids, labels, torch.ones(3), schedule=LINEAR, mask_token_id=MASK, generator=_gen())
    with pytest.raises(ValueError, match="mask_token_id=-1"):
        mask_tokens(ids, labels, torch.ones(2), schedule=LINEAR, mask_token_id=-1, generator=_gen())


# --- loss_weight ------------------------------------------------------------------------------------


def test_loss_weight() -> None:
    t = torch.tensor([0.5, 0.25], dtype=torch.float64)
    torch.testing.assert_close(
        loss_weight(t, weight_type="scheduler", schedule=LINEAR), torch.tensor([1 / 0.500001, 1 / 0.250001])
    )
    uniform = loss_weight(t, weight_type="uniform", schedule=LINEAR)
    assert uniform.dtype == torch.float32 and torch.equal(uniform, torch.ones(2))


def test_bad_weight_and_norm_types() -> None:
    t = torch.tensor([0.5])
    m = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"diffusion\.loss_weight_type='elbo'.*\['scheduler', 'uniform'\]"):
        loss_weight(t, weight_type="elbo", schedule=LINEAR)
    with pytest.raises(ValueError, match=r"diffusion\.loss_norm_type='mean'.*\['token', 'sequence', 'batch'\]"):
        token_loss_weights(t, m, m, weight_type="uniform", norm_type="mean", schedule=LINEAR)
    assert WEIGHT_TYPES == ("scheduler", "uniform") and NORM_TYPES == ("token", "sequence", "batch")


# --- token_loss_weights: hand-computed, B=3, L=4 ----------------------------------------------------

MASKABLE = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)  # n = 3, 4, 0; N_a = 7
MASKED = torch.tensor([[0, 1, 0, 1], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
T = torch.tensor([0.5, 0.25, 0.75])
W = [1 / 0.500001, 1 / 0.250001, 1 / 0.750001]


@pytest.mark.parametrize(
    "norm, expected",
    [
        ("token", [[0, 1 / 7, 0, 1 / 7], [1 / 7, 1 / 7, 1 / 7, 0], [0, 0, 0, 0]]),
        ("sequence", [[0, 1 / 9, 0, 1 / 9], [1 / 12, 1 / 12, 1 / 12, 0], [0, 0, 0, 0]]),
        ("batch", [[0, 1 / 3, 0, 1 / 3], [1 / 3, 1 / 3, 1 / 3, 0], [0, 0, 0, 0]]),
    ],
)
@pytest.mark.parametrize("weight_type", ["uniform", "scheduler"])
def test_token_loss_weights_by_hand(norm: str, expected: list[list[float]], weight_type: str) -> None:
    c = token_loss_weights(T, MASKED, MASKABLE, weight_type=weight_type, norm_type=norm, schedule=LINEAR)
    want = torch.tensor(expected)
    if weight_type == "scheduler":
        want = want * torch.tensor(W)[:, None]
    assert c.dtype == torch.float32 and c.shape == (3, 4)
    torch.testing.assert_close(c, want)


@pytest.mark.parametrize("norm", NORM_TYPES)
def test_no_maskable_tokens_gives_zeros(norm: str) -> None:
    none = torch.zeros(2, 4, dtype=torch.bool)
    t = torch.tensor([0.5, 0.1])
    c = token_loss_weights(t, none, none, weight_type="scheduler", norm_type=norm, schedule=LINEAR)
    assert torch.equal(c, torch.zeros(2, 4))


def _spec_loss(t, masked, maskable, ce, *, weight_type: str, norm_type: str) -> float:
    """docs/method.md §1.4 table, literally, with Python loops."""
    b, length = len(masked), len(masked[0])
    omega = [1 / (t[j] + 1e-6) if weight_type == "scheduler" else 1.0 for j in range(b)]
    row = [sum(omega[j] * masked[j][i] * ce[j][i] for i in range(length)) for j in range(b)]
    if norm_type == "token":
        return sum(row) / max(1, sum(map(sum, maskable)))
    if norm_type == "sequence":
        return sum(row[j] / max(1, sum(maskable[j])) for j in range(b)) / b
    return sum(row) / b


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 4),
    length=st.integers(1, 6),
    seed=st.integers(0, 2**31),
    weight_type=st.sampled_from(WEIGHT_TYPES),
    norm_type=st.sampled_from(NORM_TYPES),
)
def test_token_loss_weights_match_spec_formula(b, length, seed, weight_type, norm_type) -> None:
    g = _gen(seed)
    t = torch.rand(b, generator=g, dtype=torch.float64) * 0.99 + 0.01
    maskable = torch.rand(b, length, generator=g) < 0.7
    masked = maskable & (torch.rand(b, length, generator=g) < 0.5)
    ce = torch.rand(b, length, generator=g, dtype=torch.float64) * 5
    c = token_loss_weights(t, masked, maskable, weight_type=weight_type, norm_type=norm_type, schedule=LINEAR)
    got = (c.double() * ce).sum().item()
    want = _spec_loss(
        t.tolist(),
        masked.int().tolist(),
        maskable.int().tolist(),
        ce.tolist(),
        weight_type=weight_type,
        norm_type=norm_type,
    )
    assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_functions_do_not_sync() -> None:
    from tide_ds.diffusion.generators import make_generator
    from tide_ds.diffusion.timesteps import sample_timesteps

    ids, labels = _prompt_response_batch(4, 64, prompt=8, pad=8)
    ids, labels = ids.cuda(), labels.cuda()
    g = make_generator(0, step=0, rank=0, stream="noise", device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        t = sample_timesteps(4, time_epsilon=1e-3, generator=g, device="cuda")
        _, masked = mask_tokens(ids, labels, t, schedule=LINEAR, mask_token_id=MASK, generator=g)
        for norm in NORM_TYPES:
            token_loss_weights(t, masked, labels != -100, weight_type="scheduler", norm_type=norm, schedule=LINEAR)
    finally:
        torch.cuda.set_sync_debug_mode("default")
