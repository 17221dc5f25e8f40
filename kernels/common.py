"""Helpers shared by the Triton kernels: interpreter detection, autotune configs, dtype checks."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["FLOAT_DTYPES", "autotune_configs", "check_dtype", "is_interpreter", "tl_dtype"]

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
