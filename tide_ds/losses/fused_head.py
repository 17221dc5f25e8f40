"""Losses of the per-token target log-probabilities, fused with the LM head: one entry point, two implementations.

Legend: N flattened rows (the x_t half, B * L), D hidden, V vocabulary.

CE and the CALM family depend on the student logits only through ``lp_n = log softmax(h_n W^T)[y_n]``;
the teacher side needs ``lp`` alone, without gradient. Neither ever builds ``[N, V]`` logits
(docs/design.md decision 3). Two implementations, chosen by ``model.loss_implementation`` (docs/design.md
decision 6: a config choice, logged once, no silent fallback):

* ``pytorch``: the plain-PyTorch row-tiled path, :mod:`tide_kernels.fused_head.pytorch` (and, for
  the CE-only path, :func:`tide_ds.losses.diffusion_ce.fused_linear_masked_ce`); ``reference`` is its old,
  deprecated name (accepted with a warning: it was never the naive reference, which is ``naive.py``);
* ``triton``: the Triton kernels of :mod:`tide_kernels.fused_head` (online log-sum-exp over vocabulary
  tiles, logits recomputed for the gradients);
* ``auto`` resolves to ``triton`` on a CUDA device and ``pytorch`` elsewhere.

Both keep the gradients of the hidden states and of the weight from the forward pass and only rescale
them in backward, so the LM head weight is read in forward only (correct under ZeRO-3, where it is
gathered for the forward).
"""

from __future__ import annotations

import functools
import logging
import warnings

import torch
from tide_kernels.common import is_interpreter
from tide_kernels.fused_head import (
    LossFn,
    fused_head_loss_pytorch,
    fused_head_loss_triton,
    target_logprobs_pytorch,
    target_logprobs_triton,
)

from tide_ds.choices import LossImplementation, choices
from tide_ds.losses.diffusion_ce import fused_linear_masked_ce

__all__ = [
    "LOSS_IMPLEMENTATIONS",
    "LossFn",
    "fused_head_loss",
    "fused_masked_ce",
    "resolve_loss_implementation",
    "target_logprobs",
]

logger = logging.getLogger(__name__)

#: Old names of ``model.loss_implementation`` still accepted, with a deprecation message: old -> new.
DEPRECATED_LOSS_IMPLEMENTATIONS = {"reference": "pytorch"}
#: Current values of ``model.loss_implementation`` (its choices, :data:`tide_ds.choices.LossImplementation`,
#: less the deprecated names).
LOSS_IMPLEMENTATIONS = tuple(c for c in choices(LossImplementation) if c not in DEPRECATED_LOSS_IMPLEMENTATIONS)


@functools.cache
def _warn_deprecated(old: str, new: str) -> None:
    message = (f"model.loss_implementation={old!r} is deprecated: it names the tiled PyTorch path, now called {new!r}; "
               f"use --model.loss_implementation={new}")
    warnings.warn(message, FutureWarning, stacklevel=3)
    logger.warning(message)


_logged_choices: set[tuple[str, str]] = set()


def _log_choice(choice: str, resolved: str, device_type: str) -> None:
    """Once per implementation and device: the trainer resolves ``auto`` and then calls again with the resolved
    name, which is the same choice (issue 16: the line was printed twice)."""
    if (resolved, device_type) in _logged_choices:
        return
    _logged_choices.add((resolved, device_type))
    logger.info(
        "LM-head losses (student loss, teacher log-probs): %s implementation (model.loss_implementation=%s, device %s)",
        resolved, choice, device_type,
    )


def resolve_loss_implementation(choice: str, device: torch.device | str) -> str:
    """``"pytorch"`` or ``"triton"`` for ``model.loss_implementation=choice`` on ``device``; logged once.

    ``auto`` is Triton on CUDA and the tiled PyTorch path elsewhere. ``triton`` on a device that is not
    CUDA is a configuration error unless ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, for tests).
    ``reference`` (the old name of ``pytorch``) still works, with a deprecation message.
    """
    device = torch.device(device)
    if choice in DEPRECATED_LOSS_IMPLEMENTATIONS:
        _warn_deprecated(choice, DEPRECATED_LOSS_IMPLEMENTATIONS[choice])
        choice = DEPRECATED_LOSS_IMPLEMENTATIONS[choice]
    if choice not in LOSS_IMPLEMENTATIONS:
        raise ValueError(f"model.loss_implementation={choice!r} is not one of {list(LOSS_IMPLEMENTATIONS)}")
    if choice == "auto":
        resolved = "triton" if device.type == "cuda" else "pytorch"
    else:
        resolved = choice
    if resolved == "triton" and device.type != "cuda" and not is_interpreter():
        raise ValueError(
            f"model.loss_implementation='triton' needs a CUDA device, but this rank runs on {device.type}; "
            "use --model.loss_implementation=auto (or pytorch) here, or set TRITON_INTERPRET=1 to run the "
            "kernels in Triton's CPU interpreter (slow: for tests)"
        )
    _log_choice(choice, resolved, device.type)
    return resolved


def fused_head_loss(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_N: torch.Tensor,
    rows_N: torch.Tensor,
    loss_fn: LossFn,
    *,
    chunk_rows: int = 0,
    implementation: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``loss_fn`` of the student's target log-probs through the LM head, without ``[N, V]`` logits.

    Arguments and result as :func:`tide_kernels.fused_head.pytorch.fused_head_loss_pytorch` (the tiled
    PyTorch path; ``chunk_rows`` applies to it only, the kernels tile themselves), plus ``implementation``:
    ``auto``, ``pytorch`` or ``triton`` (see :func:`resolve_loss_implementation`).
    """
    if resolve_loss_implementation(implementation, hidden_ND.device) == "triton":
        return fused_head_loss_triton(hidden_ND, weight_VD, targets_N, rows_N, loss_fn)
    return fused_head_loss_pytorch(hidden_ND, weight_VD, targets_N, rows_N, loss_fn, chunk_rows=chunk_rows)


def fused_masked_ce(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_N: torch.Tensor,
    coeff_N: torch.Tensor,
    *,
    chunk_rows: int = 0,
    implementation: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The masked-diffusion CE ``sum(c * CE)`` through the LM head: ``(loss, nll_sum)``.

    The contract of :func:`tide_ds.losses.diffusion_ce.fused_linear_masked_ce` (``nll_sum``: the detached
    unweighted CE summed over rows with ``c != 0``), with the implementation chosen as in
    :func:`fused_head_loss`; the Triton path is the fused head loss with ``lp``-linear ``loss_fn``.
    """
    if resolve_loss_implementation(implementation, hidden_ND.device) == "pytorch":
        return fused_linear_masked_ce(hidden_ND, weight_VD, targets_N, coeff_N, chunk_rows=chunk_rows)
    if coeff_N.shape != hidden_ND.shape[:1]:
        raise ValueError(f"coeff {tuple(coeff_N.shape)} must be [N] = [{hidden_ND.shape[0]}]")

    def loss_fn(lp_N: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return -(coeff_N.to(lp_N.dtype) * lp_N).sum(), {}

    loss, lp, _ = fused_head_loss_triton(hidden_ND, weight_VD, targets_N, coeff_N != 0, loss_fn)
    return loss, -lp.sum()


@torch.no_grad()
def target_logprobs(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_N: torch.Tensor,
    rows_N: torch.Tensor,
    *,
    chunk_rows: int = 0,
    implementation: str = "auto",
) -> torch.Tensor:
    """Target log-probs ``lp [N]`` (0 on rows not needed), no gradient: the teacher side of the CALM family.

    Float32 (float64 for float64 inputs); the implementation is chosen as in :func:`fused_head_loss`.
    """
    if resolve_loss_implementation(implementation, hidden_ND.device) == "triton":
        return target_logprobs_triton(hidden_ND, weight_VD, targets_N, rows_N)
    return target_logprobs_pytorch(hidden_ND, weight_VD, targets_N, rows_N, chunk_rows=chunk_rows)
