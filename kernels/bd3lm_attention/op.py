"""Autograd op and public entry point of masked diffusion attention (BD3LM mask or key lengths)."""

from __future__ import annotations

import functools
import logging

import torch
from tide_kernels.bd3lm_attention.kernel import bd3lm_attention_bwd, bd3lm_attention_fwd
from tide_kernels.bd3lm_attention.reference import bd3lm_attention_reference
from tide_kernels.common import check_dtype, is_interpreter

__all__ = ["IMPLEMENTATIONS", "TRITON_HEAD_DIMS", "BD3LMAttentionFunction", "bd3lm_attention"]

logger = logging.getLogger(__name__)

#: ``implementation=`` values: the Triton kernels, or the plain PyTorch reference (dense mask).
IMPLEMENTATIONS = ("triton", "reference")
#: Head dims the Triton kernels are built for (``tl.arange`` needs a power of two, ``tl.dot`` >= 16).
TRITON_HEAD_DIMS = (16, 32, 64, 128)


class BD3LMAttentionFunction(torch.autograd.Function):
    """Triton forward/backward; saves q, k, v, the output and the per-row log-sum-exp.

    ``apply(q, k, v, seq_len, block_size, clean_first, key_lens, scale, block_config)``; inputs are checked
    by :func:`bd3lm_attention`. ``block_config`` (tests) forces one tile shape instead of autotuning.
    """

    @staticmethod
    def forward(ctx, q, k, v, seq_len, block_size, clean_first, key_lens, scale, block_config):
        out, lse = bd3lm_attention_fwd(
            q, k, v, seq_len=seq_len, block_size=block_size, clean_first=clean_first, key_lens=key_lens,
            scale=scale, block_config=block_config,
        )
        ctx.save_for_backward(q, k, v, out, lse, key_lens)
        ctx.mask = (seq_len, block_size, clean_first, scale, block_config)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse, key_lens = ctx.saved_tensors
        seq_len, block_size, clean_first, scale, block_config = ctx.mask
        dq, dk, dv = bd3lm_attention_bwd(
            grad_out, q, k, v, out, lse, seq_len=seq_len, block_size=block_size, clean_first=clean_first,
            key_lens=key_lens, scale=scale, block_config=block_config,
        )
        return dq, dk, dv, None, None, None, None, None, None


@functools.cache
def _log_choice(implementation: str) -> None:
    logger.info("bd3lm_attention: using the %s implementation", implementation)


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_len: int | None,
    block_size: int | None,
    clean_first: bool,
    key_lens: torch.Tensor | None,
    implementation: str,
) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r} is not supported; expected one of {IMPLEMENTATIONS}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor [B, heads, T, Dh]; got {shape}")
        check_dtype(name, t)
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; put q, k, v on one device")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, num_heads, num_tokens, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, H_kv, T, Dh]; got {tuple(k.shape)} and {tuple(v.shape)}")
    if (k.shape[0], k.shape[2], k.shape[3]) != (batch, num_tokens, head_dim):
        raise ValueError(
            f"k has shape {tuple(k.shape)}; expected [B={batch}, H_kv, T={num_tokens}, Dh={head_dim}] to match "
            f"q {tuple(q.shape)}"
        )
    if k.shape[1] == 0 or num_heads % k.shape[1]:
        raise ValueError(f"q has {num_heads} heads and k {k.shape[1]}; the query heads must be a multiple of the KV heads")
    if key_lens is None:
        if not isinstance(seq_len, int) or not isinstance(block_size, int):
            raise ValueError(
                f"seq_len={seq_len!r} and block_size={block_size!r} must both be ints (BD3LM mask) unless key_lens is given"
            )
        if seq_len <= 0 or block_size <= 0 or seq_len % block_size:
            raise ValueError(f"seq_len={seq_len} must be a positive multiple of block_size={block_size}")
        if num_tokens != 2 * seq_len:
            raise ValueError(f"q has T={num_tokens} tokens; the BD3LM layout [x_t ; x_0] expects T = 2 * seq_len = {2 * seq_len}")
    else:
        if seq_len is not None or block_size is not None or clean_first:
            raise ValueError(
                f"key_lens selects padded bidirectional attention; seq_len={seq_len!r}, block_size={block_size!r}, "
                f"clean_first={clean_first!r} must be left at None/None/False"
            )
        if key_lens.dim() != 1 or key_lens.shape[0] != batch or key_lens.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"key_lens must be an int32/int64 tensor [B={batch}]; got {key_lens.dtype} {tuple(key_lens.shape)}"
            )
        if key_lens.device != q.device:
            raise ValueError(f"key_lens is on {key_lens.device} but q is on {q.device}")
    if implementation == "triton":
        if head_dim not in TRITON_HEAD_DIMS:
            raise ValueError(f"head dim Dh={head_dim} is not supported by the Triton kernels; expected one of {TRITON_HEAD_DIMS}")
        if q.device.type != "cuda" and not is_interpreter():
            raise ValueError(
                f"implementation='triton' needs a CUDA device or TRITON_INTERPRET=1; q is on {q.device}: "
                "use implementation='reference' on this machine"
            )


def bd3lm_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    seq_len: int | None = None,
    block_size: int | None = None,
    clean_first: bool = False,
    key_lens: torch.Tensor | None = None,
    scale: float | None = None,
    implementation: str = "triton",
) -> torch.Tensor:
    """Masked diffusion attention with a fused Triton forward and backward.

    Shapes (any strides, e.g. the ``.transpose(1, 2)`` views transformers' attention interface passes):
        q: ``[B, H, T, Dh]``; k, v: ``[B, H_kv, T, Dh]`` with ``H % H_kv == 0`` (GQA: query head ``h`` uses
        K/V head ``h // (H // H_kv)``). Returns ``[B, H, T, Dh]`` in q's dtype.
    Dtypes: bfloat16, float16, float32 (accumulation in fp32), float64 (interpreter or reference; exact
        tests). Triton needs ``Dh`` in :data:`TRITON_HEAD_DIMS`.

    Masks (exactly one):
        * BD3LM (docs/method.md §2.3): ``seq_len=L``, ``block_size=K``, ``T = 2L`` tokens ``[x_t ; x_0]``
          (``clean_first=True``: ``[x_0 ; x_t]``).
        * Key lengths: ``key_lens [B]`` (int32/int64) real tokens per sequence, bidirectional among them;
          padding query rows (index >= ``key_lens[b]``) return 0 and get no gradient. Values are clamped to
          ``[0, T]``.

    Args:
        scale: softmax scale, default ``Dh ** -0.5``.
        implementation: ``"triton"`` (the kernels) or ``"reference"`` (PyTorch, dense mask); logged once.

    Raises:
        ValueError: before any launch, for a bad shape, dtype, device or mask argument.
    """
    _check_inputs(q, k, v, seq_len, block_size, clean_first, key_lens, implementation)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    _log_choice(implementation)
    if implementation == "reference":
        return bd3lm_attention_reference(
            q, k, v, seq_len=seq_len, block_size=block_size, clean_first=clean_first, key_lens=key_lens, scale=scale
        )
    return BD3LMAttentionFunction.apply(q, k, v, seq_len, block_size, bool(clean_first), key_lens, scale, None)
