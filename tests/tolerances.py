"""One table of tolerances for comparing a kernel with its float64 PyTorch reference (CONTRIBUTING.md §4).

Keyed by ``(op, dtype)``; the reference always runs in float64 on the same (upcast) inputs, so the
numbers measure the kernel's own rounding, not the input's. ``rms`` bounds the relative RMS error
``||actual - ref|| / ||ref||`` (flash-linear-attention's ``assert_close`` ratio), which is what stays
stable for 16-bit gradients summed over many keys; ``atol``/``rtol`` bound every element.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TOLERANCES", "Tolerance", "assert_close"]


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    rms: float


TOLERANCES: dict[tuple[str, torch.dtype], Tolerance] = {
    # Interpreter float64 measures ~1e-15; 1e-9 leaves room for accumulation order only.
    ("bd3lm_attention", torch.float64): Tolerance(atol=1e-9, rtol=1e-9, rms=1e-12),
    # fp32 with "ieee" dots measures ~1e-6 on the test shapes (online softmax rescaling).
    ("bd3lm_attention", torch.float32): Tolerance(atol=2e-5, rtol=2e-5, rms=1e-5),
    # 16-bit: P and dS are rounded to the input dtype before their matmuls (FlashAttention practice).
    ("bd3lm_attention", torch.float16): Tolerance(atol=1e-2, rtol=1e-2, rms=3e-3),
    ("bd3lm_attention", torch.bfloat16): Tolerance(atol=6e-2, rtol=6e-2, rms=2e-2),
    # Fused LM-head loss: interpreter float64 ~1e-15; fp32 "ieee" dots ~1e-6; 16-bit on CUDA rounds dlogits.
    ("fused_head", torch.float64): Tolerance(atol=1e-10, rtol=1e-10, rms=1e-12),
    ("fused_head", torch.float32): Tolerance(atol=5e-5, rtol=5e-5, rms=1e-5),
    ("fused_head", torch.float16): Tolerance(atol=2e-2, rtol=2e-2, rms=5e-3),
    ("fused_head", torch.bfloat16): Tolerance(atol=8e-2, rtol=8e-2, rms=2e-2),
    # Fused token divergences (both models' heads): float64 against the dense naive reference; float32 with
    # logits of magnitude ~100 (the online rescaling and the E[b - a] - lse differences cost a few ulps x 100).
    ("token_divergence", torch.float64): Tolerance(atol=1e-12, rtol=1e-10, rms=1e-12),
    ("token_divergence", torch.float32): Tolerance(atol=1e-2, rtol=1e-3, rms=1e-4),
}


def assert_close(name: str, ref: torch.Tensor, actual: torch.Tensor, *, op: str, dtype: torch.dtype) -> None:
    """Assert ``actual`` (any dtype) matches ``ref`` within ``TOLERANCES[(op, dtype)]``; the message names ``name``."""
    tol = TOLERANCES[(op, dtype)]
    ref64, actual64 = ref.detach().to(torch.float64), actual.detach().to(torch.float64)
    assert torch.isfinite(actual64).all(), f"{name}: non-finite values"
    ratio = ((actual64 - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()
    max_err = (actual64 - ref64).abs().max().item() if ref64.numel() else 0.0
    assert ratio <= tol.rms, f"{name}: relative RMS error {ratio:.3e} > {tol.rms:.1e} (max abs error {max_err:.3e})"
    torch.testing.assert_close(actual64, ref64, atol=tol.atol, rtol=tol.rtol, msg=lambda m: f"{name}: {m}")
