"""Triton kernels of tide-ds (imported as ``tide_kernels``; see DESIGN.md, decision 6)."""
