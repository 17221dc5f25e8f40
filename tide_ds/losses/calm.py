"""CALM and Reverse CALM: chunk-level likelihood matching across tokenizers (docs/method.md §5).

Legend: B batch, L student length, L_t teacher length, V vocab, C chunks (per batch, padded).

A chunk is a span of text with a common boundary in both tokenizations; every token carries the id of
its chunk (-1 = none, docs/design.md decision 4). A chunk's log-likelihood is the segment sum of the token
log-probs of its clean tokens (docs/method.md §5.1); its tempered probability is ``s = exp(l / T)`` (docs/method.md §5.2) and the loss
is a Bernoulli cross-entropy between student and teacher tempered probabilities (docs/method.md §5.3).

Deliberate departures from the reference, all in the direction of docs/method.md §5.5 / §15.6:

* Everything is computed in float32 (float64 for float64 inputs) *log space*: ``log s = l / T`` and
  ``log(1 - s) = log1mexp(l / T)``. The reference clips s to ``[1e-7, 1 - 1e-7]``, which zeroes the
  gradient of every chunk with ``l^S < T ln 1e-7`` (-32.2 at T = 2) in both directions; here the student
  is never clipped at the lower end, so forward CALM keeps its ``-q / T`` coefficient there and Reverse
  CALM's ``-(s / T) logit(q)`` decays smoothly with s.
* The teacher probability q (a constant) is still held in ``[eps, 1 - eps]``: that bounds ``logit(q)``
  by ``log((1 - eps) / eps) = 16.12``, which is exactly the docs/method.md §5.4 bound of the Reverse CALM gradient, and
  costs no student gradient.
* At the upper end of the *student* (``s -> 1``, i.e. ``l^S -> 0``, common in float32 once every token
  of a chunk is predicted with probability that rounds to 1), forward CALM's ``log(1 - s)`` is -inf and
  its gradient ``(s - q) / (T (1 - s))`` unbounded. Above ``s = 1 - eps`` that term is continued by its
  tangent at ``1 - eps``: finite value, gradient capped at the value it has there (~ 1e7 / T), instead of
  the reference's silent zero. Reverse CALM needs no ``log(1 - s)`` (it is linear in s) and is exact.
* The reference's (unused) log1mexp helper picks its two branches the wrong way round (``log1p(-exp(x))``
  near 0, where ``exp(x)`` rounds to 1); :func:`log1mexp` uses Maechler's order.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "CHUNK_EPS",
    "accumulation_dtype",
    "calm_loss",
    "chunk_bce",
    "chunk_probs",
    "chunk_sums",
    "clamp_log_prob",
    "log1mexp",
    "masked_chunk_mean",
    "tempered_log_prob",
    "token_logprobs",
]

#: Bound of the teacher / target chunk probabilities, eps in [eps, 1 - eps] (docs/method.md §5.2).
CHUNK_EPS = 1e-7
_LOG_EPS = math.log(CHUNK_EPS)
_LOG_1M_EPS = math.log1p(-CHUNK_EPS)
_LN2 = math.log(2.0)


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64 (bf16/fp16 inputs are computed in float32)."""
    dtype = torch.float32
    for x in tensors:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def token_logprobs(logits_BLV: torch.Tensor, targets_BL: torch.Tensor) -> torch.Tensor:
    """Log-prob of each target token, ``z[y] - logsumexp(z)`` in float32 (float64 for float64 logits).

    Plain-path helper (docs/method.md §5.1: gather + logsumexp, no full log-softmax). Shape ``[B, L]`` (any leading
    shape); targets outside the vocabulary (e.g. -100) must be replaced by a valid id first.
    """
    z = logits_BLV.to(accumulation_dtype(logits_BLV))
    return z.gather(-1, targets_BL.long().unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)


def chunk_sums(values_BL: torch.Tensor, chunk_ids_BL: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """Segment sums ``out[j, c] = sum_r [id[j, r] == c] values[j, r]``: ``[B, L]`` -> ``[B, C]``.

    Tokens with id -1 belong to no chunk and are ignored. Ids must lie in ``[-1, num_chunks)`` (not
    checked: that needs a host sync). Summed in float32 (float64 for float64 values) with
    ``scatter_add``, never a dense ``[B, L, C]`` matrix (docs/design.md decision 4); differentiable in values.
    Works for the student (``[B, L]``) and the teacher (``[B, L_t]``) alike.
    """
    if values_BL.shape != chunk_ids_BL.shape or values_BL.dim() != 2:
        raise ValueError(
            f"expected values and chunk ids of the same shape [B, L], got {tuple(values_BL.shape)} and "
            f"{tuple(chunk_ids_BL.shape)}"
        )
    if num_chunks < 0:
        raise ValueError(f"num_chunks={num_chunks} must be >= 0")
    ids = chunk_ids_BL.long()
    # Tokens of no chunk land in an extra column C, dropped afterwards: no masking, no NaN traps.
    index = torch.where(ids < 0, num_chunks, ids)
    out = values_BL.new_zeros((values_BL.shape[0], num_chunks + 1), dtype=accumulation_dtype(values_BL))
    return out.scatter_add(1, index, values_BL.to(out.dtype))[:, :num_chunks]


def chunk_probs(loglik_BC: torch.Tensor, temperature: float) -> torch.Tensor:
    """Tempered chunk probabilities ``exp(l / T)`` in float32 (float64 for float64 input), unclipped (docs/method.md §5.2)."""
    return torch.exp(loglik_BC.to(accumulation_dtype(loglik_BC)) / temperature)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate on both sides of ``-ln 2`` (Maechler 2012).

    Each branch sees an input clamped into its own domain so that the branch ``torch.where`` discards
    cannot feed NaN or inf into the gradient.
    """
    near_zero = x > -_LN2
    x_near = torch.where(near_zero, x, -_LN2)
    x_far = torch.where(near_zero, -_LN2, x)
    return torch.where(near_zero, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def _log1m_student(log_s: torch.Tensor) -> torch.Tensor:
    """``log(1 - s)`` from ``log s``, continued by its tangent above ``s = 1 - eps`` (module docstring)."""
    capped = log_s.clamp(max=_LOG_1M_EPS)
    # d/dx log(1 - e^x) = -1 / (e^-x - 1) at the cap; detached, since its own derivative overflows
    # to inf/inf = NaN far below the cap, where the factor (log_s - capped) is 0 anyway.
    slope = (-1.0 / torch.expm1(-capped)).detach()
    return log1mexp(capped) + (log_s - capped) * slope


def clamp_log_prob(log_p: torch.Tensor) -> torch.Tensor:
    """Hold a target log-probability in ``[log eps, log(1 - eps)]`` (docs/method.md §5.2's clip, for constants only)."""
    return log_p.clamp(_LOG_EPS, _LOG_1M_EPS)


def chunk_bce(log_s_BC: torch.Tensor, log_q_BC: torch.Tensor, *, reverse: bool) -> torch.Tensor:
    """Per-chunk Bernoulli cross-entropy in log space (docs/method.md §5.3), elementwise ``[B, C]``.

    Forward (CALM): ``-[q log s + (1 - q) log(1 - s)]``; reverse (Reverse CALM):
    ``-[s log q + (1 - s) log(1 - q)]``. ``log_s`` is the student's ``l^S / T`` (differentiable);
    ``log_q`` the target's log-probability in ``[log eps, log(1 - eps)]`` (constant). Gradients w.r.t.
    ``l^S`` (docs/method.md §5.4): forward ``(s - q) / (T (1 - s))``, reverse ``-(s / T) logit(q)``.
    """
    log1m_q = log1mexp(log_q_BC)
    if reverse:
        s = log_s_BC.exp()
        return -(s * log_q_BC + (1 - s) * log1m_q)
    # 1 - q from log(1 - q), not by subtraction: exact near q = 1 - eps in float32.
    return -(log_q_BC.exp() * log_s_BC + log1m_q.exp() * _log1m_student(log_s_BC))


def masked_chunk_mean(
    loss_BC: torch.Tensor, active_BC: torch.Tensor, weight_BC: torch.Tensor | None = None
) -> torch.Tensor:
    """``sum(active * weight * loss) / max(1, sum(active))``: the mean over active chunks (docs/method.md §5.3).

    Inactive chunks contribute exactly 0 (``torch.where``, so a non-finite inactive entry cannot leak);
    no active chunk gives 0. ``weight_BC`` (per-chunk kappa, or a per-sample omega broadcast as
    ``[B, 1]``) multiplies the active terms and does not enter the denominator.
    """
    terms = loss_BC if weight_BC is None else loss_BC * weight_BC.to(loss_BC.dtype)
    total = torch.where(active_BC, terms, torch.zeros((), dtype=terms.dtype, device=terms.device)).sum()
    return total / active_BC.sum(dtype=loss_BC.dtype).clamp_min(1.0)


def check_chunk_inputs(student_ll_BC: torch.Tensor, teacher_ll_BC: torch.Tensor, active_BC: torch.Tensor) -> None:
    if student_ll_BC.dim() != 2 or teacher_ll_BC.shape != student_ll_BC.shape or active_BC.shape != student_ll_BC.shape:
        raise ValueError(
            f"expected student, teacher chunk log-likelihoods and active mask of one shape [B, C], got "
            f"{tuple(student_ll_BC.shape)}, {tuple(teacher_ll_BC.shape)}, {tuple(active_BC.shape)}"
        )
    if active_BC.dtype != torch.bool:
        raise TypeError(f"active chunk mask must be bool, got {active_BC.dtype}")


def tempered_log_prob(
    loglik_BC: torch.Tensor, active_BC: torch.Tensor, *, temperature: float, dtype: torch.dtype
) -> torch.Tensor:
    """``log s = l / T`` in ``dtype`` on active chunks; inactive chunks get a harmless finite value.

    Replacing the *input* (not only the output) keeps NaN/inf of padded chunks out of both the value and
    the gradient: inactive chunks receive exactly zero gradient.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    filler = torch.full((), -1.0, dtype=dtype, device=loglik_BC.device)
    return torch.where(active_BC, loglik_BC.to(dtype), filler) / temperature


def calm_loss(
    student_ll_BC: torch.Tensor,
    teacher_ll_BC: torch.Tensor,
    active_BC: torch.Tensor,
    *,
    temperature: float,
    reverse: bool = False,
    weight_BC: torch.Tensor | None = None,
) -> torch.Tensor:
    """CALM (``reverse=False``, mode ``alm``) or Reverse CALM (``reverse=True``, ``reverse_alm``) (docs/method.md §5.3).

    ``L = sum_{j,c} active * kappa * BCE(s, q) / max(1, sum active)`` with ``s = exp(l^S / T)``,
    ``q = exp(l^T / T)`` (q held in ``[1e-7, 1 - 1e-7]``); no T^2 factor. Gradient w.r.t. ``l^S`` per
    active chunk, divided by the active count: forward ``(s - q) / (T (1 - s))``; reverse
    ``-(s / T) logit(q)``, bounded by ``|logit(q)| / T <= 16.12 / T`` with the sign of ``-logit(q)``.

    Args:
        student_ll_BC: student chunk log-likelihoods ``[B, C]`` (from :func:`chunk_sums`), differentiable.
        teacher_ll_BC: teacher chunk log-likelihoods ``[B, C]``; a constant.
        active_BC: bool ``[B, C]``, the active chunks chi (docs/method.md §4.4: masked, not prompt).
        temperature: T (``alm_temperature``; 2.0 default, 5.0 in the pipeline-A recipe).
        reverse: Reverse CALM instead of CALM.
        weight_BC: optional per-chunk weights kappa ``[B, C]``.

    Returns:
        Scalar loss, float32 (float64 if a log-likelihood input is float64).
    """
    check_chunk_inputs(student_ll_BC, teacher_ll_BC, active_BC)
    acc = accumulation_dtype(student_ll_BC, teacher_ll_BC)
    log_s = tempered_log_prob(student_ll_BC, active_BC, temperature=temperature, dtype=acc)
    log_q = clamp_log_prob(tempered_log_prob(teacher_ll_BC.detach(), active_BC, temperature=temperature, dtype=acc))
    return masked_chunk_mean(chunk_bce(log_s, log_q, reverse=reverse), active_BC, weight_BC)
