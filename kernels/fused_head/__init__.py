"""Fused LM-head loss (any loss of the per-token target log-probs, no ``[N, V]`` logits): Triton kernels, a tiled
PyTorch path, and the naive dense reference of the tests."""

from tide_kernels.fused_head.naive import dense_target_logprobs
from tide_kernels.fused_head.op import (
    FusedHeadLossTritonFunction,
    fused_head_loss_triton,
    target_logprobs_triton,
)
from tide_kernels.fused_head.pytorch import (
    LossFn,
    auto_chunk_rows,
    fused_head_loss_pytorch,
    target_logprobs_pytorch,
)

__all__ = [
    "FusedHeadLossTritonFunction",
    "LossFn",
    "auto_chunk_rows",
    "dense_target_logprobs",
    "fused_head_loss_pytorch",
    "fused_head_loss_triton",
    "target_logprobs_pytorch",
    "target_logprobs_triton",
]
