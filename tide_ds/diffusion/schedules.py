"""Noise ("alpha") schedules of masked diffusion (docs/method.md §1.2).

``alpha(t)`` is the probability that a token is *kept* at time ``t``; ``1 - alpha(t)`` is the masking
probability. Every method takes a tensor (or a Python float) of any shape and returns a float32 tensor
of the same shape on the same device; the arithmetic is done in float32 whatever the input dtype.

Range checks and host syncs: inputs must lie in [0, 1]. On CPU tensors a violation raises
``ValueError`` (reading a CPU tensor costs no device sync). On accelerator tensors the check is
``torch._assert_async``: no host sync, so it is safe inside the training step, but a failure surfaces
at a later kernel launch and leaves the CUDA context unusable. Out-of-range times on the device are a
bug in our own code (``sample_timesteps`` never produces them), so a fatal assert is the right response.

The reference looks the schedules up by class name (``LinearAlphaScheduler``); ``get_schedule`` accepts
those names as aliases of ``"linear"`` and ``"cosine"``.
"""

from __future__ import annotations

import difflib
import math

import torch

__all__ = ["SCHEDULES", "CosineSchedule", "LinearSchedule", "NoiseSchedule", "get_schedule"]

#: Added to the denominator of the ELBO weight, as in the reference.
ELBO_EPS = 1e-6


def _as_float32(x: torch.Tensor | float) -> torch.Tensor:
    """``x`` as a float32 tensor on its own device (Python numbers go to the CPU)."""
    return torch.as_tensor(x).to(torch.float32)


def _check(ok: torch.Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` unless every element of ``ok`` is true, without a device sync.

    CPU: checked eagerly. Accelerators: ``torch._assert_async`` (see the module docstring). Meta
    tensors carry no values and are not checked.
    """
    if ok.device.type == "cpu":
        if not bool(ok.all()):
            raise ValueError(message)
    elif ok.device.type != "meta":
        torch._assert_async(ok.all(), message)


def _check_range(x: torch.Tensor, *, name: str, low_open: bool = False, high_open: bool = False) -> None:
    """Check ``x`` lies in [0, 1], with either end open on request. NaN fails the check."""
    ok = (x > 0 if low_open else x >= 0) & (x < 1 if high_open else x <= 1)
    interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
    message = f"{name} must lie in {interval} elementwise"
    if ok.device.type == "cpu" and not bool(ok.all()):
        raise ValueError(f"{message}; got out-of-range values such as {x[~ok].flatten()[:4].tolist()}")
    _check(ok, message)


class NoiseSchedule:
    """Abstract masked-diffusion schedule: subclasses define ``_alpha`` and ``_alpha_prime``.

    Subclasses may also override ``_mask_prob`` with a closed form that is more accurate in float32
    than ``1 - alpha(t)`` (it is mathematically the same quantity).
    """

    name: str = ""

    def _alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _alpha_prime(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - self._alpha(t)

    @staticmethod
    def _time(t: torch.Tensor | float, name: str = "t") -> torch.Tensor:
        t32 = _as_float32(t)
        _check_range(t32, name=name)
        return t32

    def alpha(self, t: torch.Tensor | float) -> torch.Tensor:
        """Keep probability alpha(t). Shape of ``t``, float32."""
        return self._alpha(self._time(t))

    def alpha_prime(self, t: torch.Tensor | float) -> torch.Tensor:
        """d alpha / dt at ``t``. Shape of ``t``, float32."""
        return self._alpha_prime(self._time(t))

    def mask_prob(self, t: torch.Tensor | float) -> torch.Tensor:
        """Masking probability 1 - alpha(t). Shape of ``t``, float32."""
        return self._mask_prob(self._time(t))

    def elbo_weight(self, t: torch.Tensor | float) -> torch.Tensor:
        """ELBO weight w(t) = -alpha'(t) / (1 - alpha(t) + 1e-6). Shape of ``t``, float32.

        Linear schedule: 1 / (t + 1e-6).
        """
        t32 = self._time(t)
        return -self._alpha_prime(t32) / (self._mask_prob(t32) + ELBO_EPS)

    def reverse_ratio(self, s: torch.Tensor | float, t: torch.Tensor | float) -> torch.Tensor:
        """rho(s, t) = (1 - alpha(s)) / (1 - alpha(t)): P(still masked at s | masked at t).

        Requires 0 <= s < 1, 0 < t <= 1 and s < t elementwise. ``s`` and ``t`` broadcast; the result
        has the broadcast shape, float32. Linear schedule: s / t.
        """
        s32, t32 = _as_float32(s), _as_float32(t)
        _check_range(s32, name="reverse_ratio: s", high_open=True)
        _check_range(t32, name="reverse_ratio: t", low_open=True)
        _check(s32 < t32, "reverse_ratio: s must be smaller than t elementwise")
        return self._mask_prob(s32) / self._mask_prob(t32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LinearSchedule(NoiseSchedule):
    """alpha(t) = 1 - t, alpha'(t) = -1, mask probability t (the default of every TIDE run)."""

    name = "linear"

    def _alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - t

    def _alpha_prime(self, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(t, -1.0)

    def _mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        # Exactly t; 1 - (1 - t) loses ~1e-5 relative precision at t = 1e-3 in float32.
        return t.clone()


class CosineSchedule(NoiseSchedule):
    """alpha(t) = 1 - cos(pi/2 (1 - t)), alpha'(t) = -pi/2 sin(pi/2 (1 - t)), mask prob sin(pi/2 t).

    The sine forms are used because they are exact at both ends in float32 (cos(pi/2) is -4e-8 there,
    which would make the mask probability at t = 0 negative).
    """

    name = "cosine"

    def _alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - self._mask_prob(t)

    def _alpha_prime(self, t: torch.Tensor) -> torch.Tensor:
        return -(math.pi / 2) * torch.sin((math.pi / 2) * (1.0 - t))

    def _mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sin((math.pi / 2) * t)


#: Canonical schedule names -> classes.
SCHEDULES: dict[str, type[NoiseSchedule]] = {"linear": LinearSchedule, "cosine": CosineSchedule}

#: Lower-cased aliases: the reference's class names and ours.
_ALIASES: dict[str, str] = {
    "linearalphascheduler": "linear",
    "cosinealphascheduler": "cosine",
    "linearschedule": "linear",
    "cosineschedule": "cosine",
}


def get_schedule(name: str) -> NoiseSchedule:
    """The schedule called ``name`` (case-insensitive; reference class names accepted as aliases)."""
    key = name.strip().lower() if isinstance(name, str) else name
    key = _ALIASES.get(key, key)
    if key not in SCHEDULES:
        known = sorted(SCHEDULES)
        close = difflib.get_close_matches(str(key), known + sorted(_ALIASES), n=1)
        hint = f"; did you mean {_ALIASES.get(close[0], close[0])!r}?" if close else ""
        raise ValueError(f"diffusion.schedule={name!r} is not a known schedule; valid names: {known}{hint}")
    return SCHEDULES[key]()
