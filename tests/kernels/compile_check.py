"""The kernel tests' sm_90 compile check, run in a fresh interpreter (shared by the kernels' test modules)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def assert_compiles_without_interpreter(module: str) -> None:
    """Run ``module._compile_for_sm90()`` in a fresh interpreter without ``TRITON_INTERPRET`` (the interpreter
    never runs Triton's type checks and MLIR lowering) and fail with its stderr if it raises."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"from {module} import _compile_for_sm90; _compile_for_sm90()"
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 0, result.stderr[-4000:]
