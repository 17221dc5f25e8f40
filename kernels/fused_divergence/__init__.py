"""Fused token divergences (KL, reverse KL, TIDAL) from both models' hidden rows and heads, no ``[N, V']`` logits."""

from tide_kernels.fused_divergence.naive import dense_token_divergences
from tide_kernels.fused_divergence.op import IMPLEMENTATIONS, FusedTokenDivergenceFunction, fused_token_divergence
from tide_kernels.fused_divergence.pytorch import divergence_sweeps_pytorch

__all__ = [
    "IMPLEMENTATIONS",
    "FusedTokenDivergenceFunction",
    "dense_token_divergences",
    "divergence_sweeps_pytorch",
    "fused_token_divergence",
]
