"""Logging set-up: configured once, rank in every line, INFO on rank 0 and WARNING elsewhere."""

from __future__ import annotations

import logging
import os
import sys
import warnings

_configured = False
_warned: set[str] = set()


def setup_logging(rank: int | None = None) -> None:
    """Configure the root ``tide_ds`` logger once for this process."""
    global _configured
    if _configured:
        return
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    handler = logging.StreamHandler(sys.stderr if rank else sys.stdout)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("tide_ds")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.propagate = False
    if rank:  # library deprecation notices are the same on every rank: rank 0 shows them once
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    _configured = True


def warn_once(logger: logging.Logger, message: str) -> None:
    """Log ``message`` as a warning the first time it is seen in this process."""
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def setup_cli_logging() -> None:
    """For single-process tools (generate, eval, export): INFO lines of ``tide_ds`` on stderr, so that
    stdout carries only the tool's output."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("tide_ds")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
