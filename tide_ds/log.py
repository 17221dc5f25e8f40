"""Logging set-up: configured once, rank in every line, INFO on rank 0 and WARNING elsewhere."""

from __future__ import annotations

import logging
import os
import sys
import warnings

_configured = False
_warned: set[str] = set()

#: DeepSpeed's own lines that every process of a job prints alike (issue 16, log noise).
ACCELERATOR_MESSAGE = "Setting accelerator to CPU"


class _DeepSpeedOnce(logging.Filter):
    """On DeepSpeed's logger: the accelerator notice, which the ``deepspeed`` launcher has already printed for the
    job (a process it started has ``LOCAL_RANK``), is dropped on every rank; without a launcher rank 0 keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(ACCELERATOR_MESSAGE):
            return True
        return "LOCAL_RANK" not in os.environ and int(os.environ.get("RANK", "0")) == 0


def quiet_ranks() -> None:
    """What every rank would print alike, printed once per job: installs the filter on DeepSpeed's logger before
    DeepSpeed is imported (its logger is ``logging.getLogger("DeepSpeed")``, created on import; the notice is
    logged during the import), and leaves deprecation notices (ours, such as a renamed option, and the
    libraries') to rank 0 from the first line on, before the options are parsed. Idempotent."""
    ds_logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DeepSpeedOnce) for f in ds_logger.filters):
        ds_logger.addFilter(_DeepSpeedOnce())
    if int(os.environ.get("RANK", "0")):
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)


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
