"""The libraries users would pick instead of ours, as benchmark providers (GPU only; skipped cleanly without them).

* Liger-Kernel (``liger-kernel``): fused linear cross-entropy
  (``liger_kernel.transformers.functional.liger_fused_linear_cross_entropy(input, weight, target, ...)``: rows
  chunked, gradients formed in the forward pass) and fused linear JSD
  (``liger_kernel.transformers.fused_linear_jsd.LigerFusedLinearJSD(jsd_beta, ignore_index, temperature)``,
  ``forward(student_input, student_weight, teacher_input, teacher_weight)``: both heads over one vocabulary,
  so both are sliced to the shared prefix V'; ``[chunk, V]`` logits of both models per row chunk).
* Apple's Cut Cross-Entropy (``cut-cross-entropy``): ``cut_cross_entropy.linear_cross_entropy(e, c, targets)``,
  Triton, never builds ``[N, V]``, skips vocabulary tiles of negligible softmax in backward.

Each ``*_available()`` says whether the peer can run here (CUDA and an importable package) and why not;
``tests/benchmarks/run_gpu_checks.sh`` installs the wheels that ``tools/gpu/fetch_wheels.sh`` fetched.
Liger's generalised JSD is forward KL at ``jsd_beta = 0`` in the versions that accept the closed interval
(0.5 and later); older ones take beta in (0, 1) only, and the provider then runs beta = 0.5 (the same work:
both distributions, one sweep) and says so in its name.
"""

from __future__ import annotations

import functools
import importlib

import torch

__all__ = ["cce_available", "cce_ce", "liger_available", "liger_flce", "liger_jsd", "liger_jsd_name"]

IGNORE = -100


def _importable(module: str) -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    try:
        importlib.import_module(module)
    except Exception as err:  # an ImportError, or a package that fails at import on this machine
        return f"{module} is not importable ({type(err).__name__}: {err}); bash tools/gpu/fetch_wheels.sh, carry .whl"
    return None


def liger_available() -> str | None:
    """None when Liger-Kernel can run here, else the reason."""
    return _importable("liger_kernel.transformers.functional")


def cce_available() -> str | None:
    """None when Cut Cross-Entropy can run here, else the reason."""
    return _importable("cut_cross_entropy")


def _mean_ce_targets(targets_N: torch.Tensor, rows_N: torch.Tensor) -> torch.Tensor:
    return torch.where(rows_N, targets_N, torch.full_like(targets_N, IGNORE))


def liger_flce(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor, rows_N: torch.Tensor) -> torch.Tensor:
    """Mean CE over ``rows_N`` through Liger's fused linear cross-entropy."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(hidden_ND, weight_VD, _mean_ce_targets(targets_N, rows_N), ignore_index=IGNORE)


def cce_ce(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor, rows_N: torch.Tensor) -> torch.Tensor:
    """Mean CE over ``rows_N`` through Cut Cross-Entropy."""
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(hidden_ND, weight_VD, _mean_ce_targets(targets_N, rows_N), ignore_index=IGNORE)


@functools.cache
def _jsd_module(temperature: float):
    from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

    try:
        return LigerFusedLinearJSD(jsd_beta=0.0, temperature=temperature), 0.0
    except (AssertionError, ValueError):  # an older Liger: beta in the open interval only
        return LigerFusedLinearJSD(jsd_beta=0.5, temperature=temperature), 0.5


def liger_jsd_name(temperature: float) -> str:
    """``liger_jsd`` (forward KL, beta = 0) or ``liger_jsd_b0.5`` on an older Liger."""
    return "liger_jsd" if _jsd_module(temperature)[1] == 0.0 else "liger_jsd_b0.5"


def liger_jsd(s_hidden: torch.Tensor, s_weight: torch.Tensor, t_hidden: torch.Tensor, t_weight: torch.Tensor, *,
              vocab: int, temperature: float) -> torch.Tensor:
    """Liger's fused linear JSD on the shared prefix (both heads sliced to V', views)."""
    module, _ = _jsd_module(temperature)
    return module(s_hidden, s_weight[:vocab], t_hidden, t_weight[:vocab])
