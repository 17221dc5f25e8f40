"""Noise schedules (docs/method.md §1.2, Appendix C)."""

from __future__ import annotations

import math

import pytest
import torch

from tide_ds.diffusion.schedules import SCHEDULES, CosineSchedule, LinearSchedule, NoiseSchedule, get_schedule

SQRT_HALF = math.sqrt(0.5)  # sin(pi/4)
SQRT3_HALF = math.sqrt(3.0) / 2  # sin(pi/3)
HALF_PI = math.pi / 2


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


@pytest.mark.parametrize(
    "t, alpha, alpha_prime, weight",
    [
        (0.0, 1.0, -1.0, 1 / 1e-6),
        (0.25, 0.75, -1.0, 1 / (0.25 + 1e-6)),
        (0.5, 0.5, -1.0, 1.999996),  # docs/method.md Appendix C
        (0.9, 0.1, -1.0, 1 / (0.9 + 1e-6)),
        (1.0, 0.0, -1.0, 1 / (1 + 1e-6)),
    ],
)
def test_linear_values(t: float, alpha: float, alpha_prime: float, weight: float) -> None:
    s = LinearSchedule()
    x = _t(t)
    torch.testing.assert_close(s.alpha(x), _t(alpha))
    torch.testing.assert_close(s.alpha_prime(x), _t(alpha_prime))
    torch.testing.assert_close(s.mask_prob(x), _t(t))
    torch.testing.assert_close(s.elbo_weight(x), _t(weight), rtol=1e-6, atol=0)


def test_linear_elbo_weight_appendix_c() -> None:
    assert LinearSchedule().elbo_weight(_t(0.5)).item() == pytest.approx(1 / (0.5 + 1e-6), rel=1e-7)


@pytest.mark.parametrize(
    "t, mask, alpha_prime",
    [
        (0.0, 0.0, -HALF_PI),
        (1 / 3, 0.5, -HALF_PI * SQRT3_HALF),  # cos(pi/2 * 2/3) = 1/2
        (0.5, SQRT_HALF, -HALF_PI * SQRT_HALF),
        (1.0, 1.0, 0.0),
    ],
)
def test_cosine_values(t: float, mask: float, alpha_prime: float) -> None:
    s = CosineSchedule()
    x = _t(t)
    torch.testing.assert_close(s.mask_prob(x), _t(mask), atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(s.alpha(x), _t(1 - mask), atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(s.alpha_prime(x), _t(alpha_prime), atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(s.elbo_weight(x), _t(-alpha_prime / (mask + 1e-6)), atol=1e-7, rtol=1e-5)


def test_cosine_hand_weights() -> None:
    w = CosineSchedule().elbo_weight(_t(1 / 3, 0.5, 0.0))
    torch.testing.assert_close(w, _t(2.7206936, 1.5707941, HALF_PI / 1e-6), rtol=1e-5, atol=0)


def test_cosine_mask_prob_never_negative() -> None:
    t = torch.linspace(0, 1, 1001)
    m = CosineSchedule().mask_prob(t)
    assert m.min().item() >= 0.0 and m.max().item() <= 1.0
    assert m[0].item() == 0.0 and m[-1].item() == 1.0


@pytest.mark.parametrize("schedule", [LinearSchedule(), CosineSchedule()], ids=["linear", "cosine"])
def test_alpha_prime_is_the_derivative(schedule: NoiseSchedule) -> None:
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-3
    numeric = (schedule.alpha(t + h).double() - schedule.alpha(t - h).double()) / (2 * h)
    torch.testing.assert_close(schedule.alpha_prime(t).double(), numeric, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16, torch.float32])
def test_outputs_are_float32(dtype: torch.dtype) -> None:
    s = CosineSchedule()
    x = torch.tensor([0.25, 0.5], dtype=dtype)
    for out in (s.alpha(x), s.alpha_prime(x), s.mask_prob(x), s.elbo_weight(x), s.reverse_ratio(x / 2, x)):
        assert out.dtype == torch.float32 and out.shape == (2,)


def test_python_float_input() -> None:
    out = LinearSchedule().alpha(0.25)
    assert out.dtype == torch.float32 and out.shape == () and out.item() == 0.75


def test_reverse_ratio_linear_is_s_over_t() -> None:
    s = _t(0.0, 0.1, 0.3, 0.5)
    t = _t(0.5, 0.4, 0.9, 1.0)
    torch.testing.assert_close(LinearSchedule().reverse_ratio(s, t), s / t)


def test_reverse_ratio_cosine_and_broadcast() -> None:
    t = _t(1.0)
    s = _t(0.5, 1 / 3)
    torch.testing.assert_close(CosineSchedule().reverse_ratio(s, t), _t(SQRT_HALF, 0.5))


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
@pytest.mark.parametrize("method", ["alpha", "alpha_prime", "mask_prob", "elbo_weight"])
def test_out_of_range_t_raises(method: str, bad: float) -> None:
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        getattr(LinearSchedule(), method)(_t(0.5, bad))


def test_out_of_range_message_shows_value() -> None:
    with pytest.raises(ValueError, match=r"-0\.25"):
        CosineSchedule().mask_prob(_t(0.5, -0.25))


@pytest.mark.parametrize(
    "s, t, match",
    [
        (0.5, 0.5, "s must be smaller than t"),
        (0.6, 0.5, "s must be smaller than t"),
        (1.0, 1.0, r"s must lie in \[0, 1\)"),
        (-0.1, 0.5, r"s must lie in \[0, 1\)"),
        (0.0, 0.0, r"t must lie in \(0, 1\]"),
        (0.1, 1.2, r"t must lie in \(0, 1\]"),
    ],
)
def test_reverse_ratio_range_checks(s: float, t: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LinearSchedule().reverse_ratio(_t(s), _t(t))


@pytest.mark.parametrize(
    "name, cls",
    [
        ("linear", LinearSchedule),
        ("LINEAR", LinearSchedule),
        (" Cosine ", CosineSchedule),
        ("LinearAlphaScheduler", LinearSchedule),
        ("cosinealphascheduler", CosineSchedule),
        ("CosineSchedule", CosineSchedule),
    ],
)
def test_get_schedule(name: str, cls: type) -> None:
    assert type(get_schedule(name)) is cls


def test_registry_names() -> None:
    assert sorted(SCHEDULES) == ["cosine", "linear"]
    assert all(cls().name == name for name, cls in SCHEDULES.items())


def test_get_schedule_unknown_suggests_closest() -> None:
    with pytest.raises(ValueError, match=r"'cosin'.*\['cosine', 'linear'\].*did you mean 'cosine'"):
        get_schedule("cosin")
    with pytest.raises(ValueError, match=r"did you mean 'linear'"):
        get_schedule("LinearAlphaSchedular")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_validation_does_not_sync() -> None:
    t = torch.tensor([0.1, 0.5, 1.0], device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        w = CosineSchedule().elbo_weight(t)
        r = LinearSchedule().reverse_ratio(t / 2, t)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(r.cpu(), torch.full((3,), 0.5))
    assert w.device.type == "cuda"
