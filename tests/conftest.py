import os

import torch

if not torch.cuda.is_available():
    # Triton reads TRITON_INTERPRET when @triton.jit runs, i.e. at import of the kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
