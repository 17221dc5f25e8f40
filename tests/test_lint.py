"""The tree passes ruff with the configuration of pyproject.toml (imports, pyflakes, bugbear, pyupgrade)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(
    importlib.util.find_spec("ruff") is None, reason="ruff is not installed (pip install -e '.[test]' installs it)"
)
def test_ruff_check_passes():
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, (
        "ruff check found problems (python -m ruff check --fix . fixes the ones marked [*]):\n"
        + proc.stdout[-6000:] + proc.stderr[-2000:]
    )
