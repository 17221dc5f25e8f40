"""Masked diffusion attention (BD3LM block mask or key lengths): Triton forward/backward, PyTorch reference."""

from tide_kernels.bd3lm_attention.op import BD3LMAttentionFunction, bd3lm_attention
from tide_kernels.bd3lm_attention.reference import bd3lm_attention_reference

__all__ = ["BD3LMAttentionFunction", "bd3lm_attention", "bd3lm_attention_reference"]
