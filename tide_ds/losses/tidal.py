"""TIDAL: targets interpolated between student and teacher along two axes (docs/method.md §7).

The reference code calls this method "TAID". Legend: B batch, N selected rows, C chunks, V' shared
vocabulary prefix.

* Training-progress axis (docs/method.md §7.1): ``lambda_train = init + (max - init) g(p)``, ``g`` cosine or linear
  growth in the progress ``p = step / max(max_steps, 1)``.
* Timestep axis (docs/method.md §7.2): per sample ``lambda_j`` = ``lambda_train (1 - t_j)`` (``both``),
  ``lambda_train`` (``training_only``) or ``lambda_max (1 - t_j)`` (``timestep_only``); and a per-sample
  weight ``omega_j``: 1 (``uniform``) or a Gaussian in t centred at 0.5 with sigma 0.15 (``midrange``).
* Token level (docs/method.md §7.3): forward KL from the detached logit-space mix ``softmax(((1-lambda) z^S + lambda z^T)/T)``
  to the student, times ``T^2 omega_j``, mean over the rows.
* Chunk level (docs/method.md §7.4): CALM / Reverse CALM against the detached probability-space mix
  ``(1 - lambda) s + lambda q``; no T^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tide_ds.choices import TidalAxis, TidalGrowth, TidalTimestepWeight, choices
from tide_ds.losses.calm import (
    accumulation_dtype,
    check_chunk_inputs,
    chunk_bce,
    clamp_log_prob,
    masked_chunk_mean,
    tempered_log_prob,
)
from tide_ds.losses.kl import row_divergence

__all__ = [
    "AXIS_MODES",
    "GROWTHS",
    "TIMESTEP_WEIGHTS",
    "TidalSchedule",
    "chunk_tidal",
    "lambda_train",
    "timestep_weight",
    "token_tidal",
    "training_progress",
]

#: Growth curves g(p) of the training-progress axis (the reference's ``taid_lambda_decay``).
GROWTHS = choices(TidalGrowth)
#: Timestep-axis modes (``taid_axis_mode``).
AXIS_MODES = choices(TidalAxis)
#: Per-sample weights (``taid_timestep_weight``).
TIMESTEP_WEIGHTS = choices(TidalTimestepWeight)

_MIDRANGE_SIGMA = 0.15


def _choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{option}={value!r} is not one of {list(choices)}")


def training_progress(step: int, max_steps: int) -> float:
    """``p = step / max(max_steps, 1)`` in optimizer steps (docs/method.md §7.1)."""
    return step / max(max_steps, 1)


def lambda_train(
    progress: float, *, lambda_init: float = 0.1, lambda_max: float = 0.9, growth: str = "cosine"
) -> float:
    """``lambda_init + (lambda_max - lambda_init) g(p)``, ``g = (1 - cos(pi p)) / 2`` or ``p`` (docs/method.md §7.1).

    A growth, not a decay: early targets sit near the student, late ones near the teacher.
    """
    _choice("distill.tidal_growth", growth, GROWTHS)
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"training progress {progress!r} must lie in [0, 1] (step / max_steps)")
    g = 0.5 * (1.0 - math.cos(math.pi * progress)) if growth == "cosine" else progress
    return lambda_init + (lambda_max - lambda_init) * g


def timestep_weight(t_B: torch.Tensor, kind: str = "uniform") -> torch.Tensor:
    """Per-sample weight omega (docs/method.md §7.3): ones, or ``exp(-(t - 0.5)^2 / (2 * 0.15^2))`` for ``midrange``.

    float32 ``[B]`` (float64 for float64 t).
    """
    _choice("distill.tidal_timestep_weight", kind, TIMESTEP_WEIGHTS)
    t = t_B.to(accumulation_dtype(t_B))
    if kind == "uniform":
        return torch.ones_like(t)
    return torch.exp(-((t - 0.5) ** 2) / (2 * _MIDRANGE_SIGMA**2))


@dataclass(frozen=True, kw_only=True)
class TidalSchedule:
    """The TIDAL interpolation schedule (docs/method.md §7.1-7.2), validated once."""

    #: lambda at the start of training.
    lambda_init: float = 0.1
    #: lambda at the end of training (also the scale of the ``timestep_only`` axis).
    lambda_max: float = 0.9
    #: Growth curve of lambda over training: "cosine" or "linear".
    growth: str = "cosine"
    #: Which axes move lambda: "both", "training_only" or "timestep_only".
    axis: str = "both"
    #: Per-sample weight: "uniform" or "midrange" (Gaussian in t centred at 0.5).
    timestep_weight: str = "uniform"

    def __post_init__(self) -> None:
        for name in ("lambda_init", "lambda_max"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"distill.tidal_{name}={value!r} must lie in [0, 1] (an interpolation weight)")
        _choice("distill.tidal_growth", self.growth, GROWTHS)
        _choice("distill.tidal_axis", self.axis, AXIS_MODES)
        _choice("distill.tidal_timestep_weight", self.timestep_weight, TIMESTEP_WEIGHTS)

    def lambda_train(self, progress: float) -> float:
        """The training-progress axis alone (docs/method.md §7.1); logged as ``lambda_train``."""
        return lambda_train(progress, lambda_init=self.lambda_init, lambda_max=self.lambda_max, growth=self.growth)

    def sample_lambda(self, t_B: torch.Tensor, *, progress: float) -> torch.Tensor:
        """Per-sample lambda_j (docs/method.md §7.2), float32 ``[B]`` (float64 for float64 t)."""
        t = t_B.to(accumulation_dtype(t_B))
        if self.axis == "training_only":
            return torch.full_like(t, self.lambda_train(progress))
        scale = self.lambda_max if self.axis == "timestep_only" else self.lambda_train(progress)
        return scale * (1.0 - t)

    def sample_weight(self, t_B: torch.Tensor) -> torch.Tensor:
        """Per-sample omega_j (docs/method.md §7.3), float32 ``[B]``."""
        return timestep_weight(t_B, self.timestep_weight)


def token_tidal(
    student_logits_NV: torch.Tensor,
    teacher_logits_NV: torch.Tensor,
    lambda_N: torch.Tensor | float,
    *,
    temperature: float,
    shared_vocab_size: int | None = None,
    weight_N: torch.Tensor | None = None,
    chunk_rows: int = 0,
) -> torch.Tensor:
    """Token-level TIDAL (modes ``taid``, ``taid_aligned``; docs/method.md §7.3), on the given rows.

    Per row n of sample j: ``r = sg(softmax(((1 - lambda_j) z^S + lambda_j z^T) / T))`` on the V' prefix
    and ``KL(r || softmax(z^S / T))``. Loss ``T^2 sum_n omega_n KL_n / max(1, N)`` (normalised by the row
    count, not by the sum of omega); N = 0 gives 0. Gradient w.r.t. the student logits:
    ``T omega_n (softmax(z^S / T) - r) / N``: zero at lambda = 0, the forward-KL gradient at lambda = 1.
    The target's log uses ``log_softmax`` rather than the reference's ``log(max(r, 1e-8))``: same
    gradient, and an exact zero loss when student and teacher agree.

    Args:
        student_logits_NV: ``[N, V_s]`` student logits of the selected rows.
        teacher_logits_NV: ``[N, V_t]`` teacher logits of the same rows (a constant).
        lambda_N: per-row lambda ``[N]`` (each row's sample lambda_j, e.g. ``lambda_B[row_sample]``) or one float.
        temperature: T (``kl_temperature``, 2.0).
        shared_vocab_size: V' (None: the widths must be equal and nothing is sliced).
        weight_N: per-row omega ``[N]``; None means 1.
        chunk_rows: rows per tile; 0 picks one automatically.

    Returns:
        Scalar loss, float32 (float64 for float64 student logits).
    """
    if not isinstance(lambda_N, torch.Tensor):
        lambda_N = torch.full(student_logits_NV.shape[:1], float(lambda_N), device=student_logits_NV.device)
    return row_divergence(
        student_logits_NV,
        teacher_logits_NV,
        kind="tidal",
        temperature=temperature,
        shared_vocab_size=shared_vocab_size,
        lam_N=lambda_N.detach(),
        weight_N=weight_N,
        chunk_rows=chunk_rows,
    )


def chunk_tidal(
    student_ll_BC: torch.Tensor,
    teacher_ll_BC: torch.Tensor,
    active_BC: torch.Tensor,
    lambda_B: torch.Tensor,
    *,
    temperature: float,
    reverse: bool = False,
    weight_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """Chunk-level TIDAL (modes ``alm_taid``, ``reverse_alm_taid``; docs/method.md §7.4).

    Target ``m = clip(sg((1 - lambda_j) s + lambda_j q), eps, 1 - eps)`` mixed in tempered-probability
    space (computed as a log-sum-exp of ``log s`` and ``log q``); loss = forward or reverse chunk BCE of
    the student against m (:func:`tide_ds.losses.calm.chunk_bce`), times omega_j, mean over active chunks
    (``max(1, sum active)``); no T^2. Forward gradient w.r.t. ``l^S``: ``lambda omega (s - q) / (T (1 - s))``
    = CALM's gradient rescaled by ``lambda omega``. The reverse form lets the student's own s into the
    target (docs/method.md §7.5) and exists for ablations.

    Args:
        student_ll_BC: student chunk log-likelihoods ``[B, C]``, differentiable.
        teacher_ll_BC: teacher chunk log-likelihoods ``[B, C]``; a constant.
        active_BC: bool ``[B, C]`` active chunks.
        lambda_B: per-sample lambda ``[B]`` (:meth:`TidalSchedule.sample_lambda`).
        temperature: T (``alm_temperature``).
        reverse: reverse chunk BCE.
        weight_B: per-sample omega ``[B]``; None means 1.

    Returns:
        Scalar loss, float32 (float64 if a log-likelihood input is float64).
    """
    check_chunk_inputs(student_ll_BC, teacher_ll_BC, active_BC)
    if lambda_B.shape != student_ll_BC.shape[:1]:
        raise ValueError(f"lambda must have shape [B] = [{student_ll_BC.shape[0]}], got {tuple(lambda_B.shape)}")
    acc = accumulation_dtype(student_ll_BC, teacher_ll_BC)
    log_s = tempered_log_prob(student_ll_BC, active_BC, temperature=temperature, dtype=acc)
    log_q = clamp_log_prob(tempered_log_prob(teacher_ll_BC.detach(), active_BC, temperature=temperature, dtype=acc))
    lam = lambda_B.detach().to(acc)[:, None]  # [B, 1]
    # log((1 - lam) s + lam q); log(0) = -inf at lam in {0, 1} is exact here (logaddexp drops the term).
    log_m = torch.logaddexp(torch.log1p(-lam) + log_s.detach(), torch.log(lam) + log_q)
    loss_BC = chunk_bce(log_s, clamp_log_prob(log_m), reverse=reverse)
    weight = None if weight_B is None else weight_B.to(acc)[:, None]
    return masked_chunk_mean(loss_BC, active_BC, weight)
