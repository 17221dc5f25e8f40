"""Triton kernels of tide-ds (imported as ``tide_kernels``; see docs/design.md, decision 6)."""
