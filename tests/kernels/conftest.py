"""Kernel tests on a machine with a GPU: only the tests marked ``any_device`` run there.

The other tests are interpreter tests: CPU tensors, mostly float64 (exact comparisons), Triton in its CPU
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA). CI runs them. On a GPU machine
Triton compiles instead and refuses CPU tensors, and float64 tiles of the GPU configs do not fit in shared
memory, so there the ``*_cuda`` tests (compiled kernels in fp32/fp16/bf16 against float64 references) and
the benchmarks' own correctness checks cover the compiled kernels.

Every test here runs with ``torch.empty`` / ``torch.empty_like`` returning NaN-filled floating tensors, so an
output the kernel forgot to write fails the comparison instead of passing on whatever memory held.
"""

from __future__ import annotations

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "any_device: a kernel test that also runs on a GPU machine (see tests/kernels/conftest.py)")


@pytest.fixture(autouse=True)
def nan_filled_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.empty`` and ``torch.empty_like`` fill floating tensors with NaN for the duration of a test."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
        return tensor

    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: poisoned(real_empty(*args, **kwargs)))
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: poisoned(real_empty_like(*args, **kwargs)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="interpreter test (CPU tensors, Triton's interpreter): CI runs it; GPUs run the *_cuda tests")
    here = __file__.rsplit("/", 1)[0]
    for item in items:
        if str(item.path).startswith(here) and item.get_closest_marker("any_device") is None:
            item.add_marker(skip)
