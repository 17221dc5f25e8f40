"""Helpers shared by the Triton kernels: interpreter detection, autotune configs, dtype checks."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = [
    "FLOAT_DTYPES",
    "autotune_configs",
    "check_dtype",
    "compute_dtypes",
    "is_interpreter",
    "logits_tile",
    "pick_kernel",
    "scaled_forward_grads",
    "tl_dtype",
]

#: Floating dtypes the kernels accept; float64 only makes sense in the interpreter (exactness tests).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def is_interpreter() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_configs(configs: list[triton.Config], interpreter_config: triton.Config) -> list[triton.Config]:
    """The configs to autotune over: ``configs`` on a GPU, ``[interpreter_config]`` in the interpreter.

    With several configs, triton 3.9's autotuner benchmarks them and raises "0 active drivers" on a
    CPU-only machine; one config skips benchmarking. Read at import (where ``@triton.autotune`` runs).
    """
    return [interpreter_config] if is_interpreter() else list(configs)


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    """The Triton dtype of a torch floating dtype in :data:`FLOAT_DTYPES`."""
    return _TL_DTYPES[dtype]


def check_dtype(name: str, tensor: torch.Tensor, allowed: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``tensor.dtype`` is one of ``allowed``."""
    if tensor.dtype not in allowed:
        expected = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise ValueError(f"{name}.dtype={tensor.dtype} is not supported; expected one of {expected}")


def compute_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype, str]:
    """(torch accumulator dtype, its Triton twin, ``tl.dot`` input precision) for an input dtype.

    float64 accumulates in float64; everything else in float32. fp32 inputs use "ieee" dots so that fp32
    runs are fp32 (tf32 would cost ~1e-3); 16-bit inputs ignore the precision (tensor cores).
    """
    if dtype == torch.float64:
        return torch.float64, tl.float64, "ieee"
    return torch.float32, tl.float32, "ieee" if dtype == torch.float32 else "tf32"


def pick_kernel(kernel, block_config: dict[str, int] | None):
    """The autotuned kernel, or its plain JIT function when a test forces one tile shape."""
    return (kernel, {}) if block_config is None else (kernel.fn, dict(block_config))


@triton.jit
def logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, stride_hn, stride_hd, stride_wv, stride_wd, D,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``h[rows] @ W[cols]^T`` as a ``[BLOCK_N, BLOCK_V]`` accumulator tile (out-of-range entries are 0)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=ACC_DTYPE)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_ok = d < D
        h = tl.load(h_ptr + rows[:, None] * stride_hn + d[None, :] * stride_hd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_wv + d[None, :] * stride_wd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    return acc


def scaled_forward_grads(ctx, grad_out: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> tuple[torch.Tensor | None, ...]:
    """Backward of a fused loss: the gradients its forward computed (``ctx.save_for_backward``), times the
    upstream scalar ``grad_out``, cast to ``dtypes``.

    They are scaled in place and the saved tensor itself is returned (when no cast is needed), so the peak
    holds one copy of the ``[V, D]`` weight gradient: autograd releases the saved tensors after this call and
    hands the very tensor to ``param.grad``. The out-of-place ``grad * grad_out`` held two. In place through
    ``.data`` (no version bump), with the factor already applied remembered on the device, so a repeated
    backward (``retain_graph=True``, gradcheck) gets ``grad_out / previous`` and stays exact for equal factors;
    after a zero upstream gradient the stored values are lost, and a repeat yields NaN rather than a wrong
    number. No host synchronisation.
    """
    previous = getattr(ctx, "applied_scale", None)
    factor = grad_out.detach() if previous is None else grad_out.detach() / previous
    ctx.applied_scale = grad_out.detach().clone()
    out = []
    for grad, dtype in zip(ctx.saved_tensors, dtypes):
        if grad is not None:
            grad.data.mul_(factor.to(grad.dtype))
            grad = grad if grad.dtype == dtype else grad.to(dtype)
        out.append(grad)
    return tuple(out)


def accumulate_head_grads(
    logits_nV: torch.Tensor,
    lse_n: torch.Tensor,
    targets_n: torch.Tensor,
    scale_n: torch.Tensor,
    h_nD: torch.Tensor,
    weight_VD: torch.Tensor,
    grad_h: torch.Tensor | None,
    grad_w: torch.Tensor | None,
    idx,
) -> None:
    """One logits tile's share of the gradients of ``sum_n scale_n * CE_n`` through an LM head, in place.

    ``d CE / d logits = softmax - onehot``; the tile ``logits_nV`` is overwritten with it (times ``scale_n``)
    so no second ``[n, V]`` buffer exists. ``grad_h[idx]`` receives ``probs @ W`` and ``grad_w`` accumulates
    ``probs^T h``; either may be ``None`` when its input needs no gradient. A loss of the target log-prob
    ``lp = -CE`` with upstream ``g`` passes ``scale_n = -g``.
    """
    probs = logits_nV.sub_(lse_n.unsqueeze(-1)).exp_()  # [n, V] softmax
    probs.scatter_add_(-1, targets_n.unsqueeze(-1), -torch.ones_like(lse_n).unsqueeze(-1))
    probs.mul_(scale_n.unsqueeze(-1))
    if grad_h is not None:
        grad_h[idx] = (probs @ weight_VD).to(grad_h.dtype)
    if grad_w is not None:
        grad_w.addmm_(probs.t(), h_nD)
