"""Kernel tests on a machine with a GPU: only the tests marked ``any_device`` run there.

The other tests are interpreter tests: CPU tensors, mostly float64 (exact comparisons), Triton in its CPU
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA). CI runs them. On a GPU machine
Triton compiles instead and refuses CPU tensors, and float64 tiles of the GPU configs do not fit in shared
memory, so there the ``*_cuda`` tests (compiled kernels in fp32/fp16/bf16 against float64 references) and
the benchmarks' own correctness checks cover the compiled kernels.
"""

from __future__ import annotations

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "any_device: a kernel test that also runs on a GPU machine (see tests/kernels/conftest.py)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="interpreter test (CPU tensors, Triton's interpreter): CI runs it; GPUs run the *_cuda tests")
    here = __file__.rsplit("/", 1)[0]
    for item in items:
        if str(item.path).startswith(here) and item.get_closest_marker("any_device") is None:
            item.add_marker(skip)
