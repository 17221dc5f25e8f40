"""Diffusion-time sampling (docs/method.md §1.1)."""

from __future__ import annotations

import pytest
import torch

from tide_ds.diffusion.timesteps import sample_timesteps


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_matches_formula() -> None:
    t = sample_timesteps(7, time_epsilon=0.1, generator=_gen(3))
    u = torch.rand(7, generator=_gen(3))
    torch.testing.assert_close(t, 0.1 + 0.9 * u)
    assert t.dtype == torch.float32 and t.shape == (7,) and t.device.type == "cpu"


@pytest.mark.parametrize("eps", [1e-3, 0.3, 0.999])
def test_range(eps: float) -> None:
    t = sample_timesteps(100_000, time_epsilon=eps, generator=_gen())
    assert t.min().item() >= torch.tensor(eps, dtype=torch.float32).item()
    assert t.max().item() < 1.0
    # Uniform on [eps, 1): mean (1 + eps) / 2, std (1 - eps) / sqrt(12); 6 standard errors of the mean.
    tol = 6 * (1 - eps) / (12**0.5) / (100_000**0.5)
    assert abs(t.double().mean().item() - (1 + eps) / 2) < tol


def test_same_generator_state_same_times() -> None:
    a = sample_timesteps(16, time_epsilon=1e-3, generator=_gen(5))
    b = sample_timesteps(16, time_epsilon=1e-3, generator=_gen(5))
    c = sample_timesteps(16, time_epsilon=1e-3, generator=_gen(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_advances_generator() -> None:
    g = _gen(5)
    a = sample_timesteps(4, time_epsilon=1e-3, generator=g)
    b = sample_timesteps(4, time_epsilon=1e-3, generator=g)
    assert not torch.equal(a, b)


def test_empty_batch() -> None:
    assert sample_timesteps(0, time_epsilon=1e-3, generator=_gen()).shape == (0,)


@pytest.mark.parametrize("eps", [0.0, 1.0, -0.5, 1.5, float("nan")])
def test_bad_epsilon(eps: float) -> None:
    with pytest.raises(ValueError, match=r"diffusion\.time_epsilon=.*\(0, 1\)"):
        sample_timesteps(4, time_epsilon=eps, generator=_gen())


def test_bad_batch_size() -> None:
    with pytest.raises(ValueError, match="batch_size=-1"):
        sample_timesteps(-1, time_epsilon=1e-3, generator=_gen())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_generator_to_cuda_device() -> None:
    t = sample_timesteps(5, time_epsilon=0.2, generator=_gen(1), device="cuda")
    assert t.device.type == "cuda"
    torch.testing.assert_close(t.cpu(), sample_timesteps(5, time_epsilon=0.2, generator=_gen(1)))
