"""Fused LM-head loss (any loss of the per-token target log-probs, no ``[N, V]`` logits): Triton, PyTorch reference."""

from tide_kernels.fused_head.op import (
    FusedHeadLossTritonFunction,
    fused_head_loss_triton,
    target_logprobs_triton,
)
from tide_kernels.fused_head.reference import (
    LossFn,
    auto_chunk_rows,
    dense_target_logprobs_reference,
    fused_head_loss_reference,
    target_logprobs_reference,
)

__all__ = [
    "FusedHeadLossTritonFunction",
    "LossFn",
    "auto_chunk_rows",
    "dense_target_logprobs_reference",
    "fused_head_loss_reference",
    "fused_head_loss_triton",
    "target_logprobs_reference",
    "target_logprobs_triton",
]
