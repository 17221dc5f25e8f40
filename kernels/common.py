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
    "is_interpreter",
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
