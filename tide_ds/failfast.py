"""One rank's failure ends the whole job within seconds, with one clear message.

Without this, an exception on one rank leaves the others blocked in a collective that the failed rank
never joins, silent until the backend's timeout (10 min under gloo, 30 under NCCL), and the shutdown path
(``dist.destroy``'s barrier) blocks the failed rank as well. Here, on an exception in :func:`run`:

* the rank does nothing collective: it records the failure in a small file that the ranks of this job
  on this machine share (:func:`failure_file`), prints its message (once per job: a rank whose error is
  the same as the one recorded, or only the consequence of it, "connection closed by peer", stays
  quiet), flushes, unlinks its shared-memory buffer and leaves with ``os._exit`` (no interpreter
  teardown, whose process-group destructors can block);
* every other rank has a watchdog thread (:func:`install`) that sees the file within half a second,
  whatever it is doing (a collective, a long forward, a file read), and exits with the same status;
* the DeepSpeed launcher, seeing a rank exit non-zero, stops the rest and exits with that status;
  across nodes, ``srun --kill-on-bad-exit`` and the backend's own error on a closed connection do
  the same (gloo raises within a second of its peer's exit).

Exit status: 2 for a :class:`~tide_ds.errors.ConfigError` (a mistake the user can fix: one line naming
the rank, no traceback), :data:`DIVERGED_EXIT_CODE` for a diverged run, 74 for a checkpoint that could
not be written, 1 for anything else (a bug: printed with its traceback).

``TIDE_DS_FAULT`` (tests): ``point:rank[,point:rank...]`` makes :func:`fault` raise at that point on that
rank: ``resume`` (loading a checkpoint), ``save`` (writing one, after this rank's files), ``step``
(after an optimizer step); ``point@N`` only at step N.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tide_ds import dist
from tide_ds.errors import ConfigError

logger = logging.getLogger(__name__)

FAULT_ENV = "TIDE_DS_FAULT"
#: Exit status of a run stopped because its loss or gradient norm stayed non-finite (sysexits' EX_DATAERR).
DIVERGED_EXIT_CODE = 65
_PEER_LOSS = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused",
              "socket closed", "ncclremoteerror", "remote process exited")


class InjectedFault(RuntimeError):
    """Raised by :func:`fault` where ``TIDE_DS_FAULT`` asks for it."""


def fault(point: str, step: int | None = None) -> None:
    """Raise :class:`InjectedFault` if ``TIDE_DS_FAULT`` names ``point`` (at ``step``) on this rank (a test hook).

    ``TIDE_DS_FAULT=point[@step]:rank[,...]``, e.g. ``resume:1``, ``step@3:0``, ``save@2:1``; rank ``*``: all.
    """
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return
    me = dist.rank()
    for item in spec.split(","):
        where, _, rank = item.strip().partition(":")
        name, _, at = where.partition("@")
        if name == point and (not at or (step is not None and int(at) == step)) and rank in ("", "*", str(me)):
            raise InjectedFault(f"injected fault at {where!r} on rank {me} at t={time.time():.3f} ({FAULT_ENV}={spec})")


def exit_code(err: BaseException) -> int:
    """2 for a :class:`~tide_ds.errors.ConfigError`, an error's own ``exit_code``, 130 for Ctrl-C, else 1."""
    code = getattr(err, "exit_code", None)
    if isinstance(code, int):
        return code
    if isinstance(err, SystemExit):
        return err.code if isinstance(err.code, int) else 1
    if isinstance(err, KeyboardInterrupt):
        return 130
    return 2 if isinstance(err, ConfigError) else 1


def is_peer_loss(err: BaseException) -> bool:
    """True for the errors a rank sees because another rank died (gloo/NCCL connection errors)."""
    text = f"{type(err).__name__}: {err}".lower()
    return "distnetworkerror" in text or any(s in text for s in _PEER_LOSS)


# --- the job's failure record ---


def _launcher_id() -> str:
    """The parent process (the DeepSpeed launcher, or srun's step) and its start time: unique to this job."""
    ppid = os.getppid()
    try:
        import psutil

        return f"{ppid}-{int(psutil.Process(ppid).create_time() * 1000)}"
    except Exception:  # noqa: BLE001 -- psutil missing or the parent gone: the pid alone still tells jobs apart
        return str(ppid)


def _jobs_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"tide-ds-jobs-{os.getuid()}"


def failure_file() -> Path:
    """The file in which the first failing rank of this job (on this machine) records its failure."""
    key = f"{os.environ.get('MASTER_ADDR', 'local')}-{os.environ.get('MASTER_PORT', '0')}-{_launcher_id()}"
    return _jobs_dir() / f"{key}.failed"


def _claim(record: str) -> str | None:
    """Record this failure unless one is recorded already; return the earlier record, or None if this is first."""
    path = failure_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(record)
    try:
        os.link(tmp, path)  # atomic create-with-content: fails if another rank was first
        return None
    except FileExistsError:
        return path.read_text()
    finally:
        tmp.unlink(missing_ok=True)


def _clean_stale() -> None:
    """Remove failure records of jobs whose launcher is gone (they would never be read again)."""
    try:
        import psutil
    except ImportError:
        return
    for path in _jobs_dir().glob("*.failed"):
        ppid = path.name[: -len(".failed")].split("-")[-2]
        if ppid.isdigit() and not psutil.pid_exists(int(ppid)):
            path.unlink(missing_ok=True)


# --- exiting ---


def _flush() -> None:
    for handler in logging.getLogger().handlers + logging.getLogger("tide_ds").handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001 -- leaving anyway
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass


def _leave(code: int) -> None:
    _flush()
    if dist.is_initialized():
        dist.unlink_shm_buffer()
    os._exit(code)


def _is_user_error(err: BaseException) -> bool:
    """A mistake the user can fix (one line, no traceback): a ConfigError, an exit request, or an error with its own status."""
    return isinstance(err, (ConfigError, SystemExit)) or getattr(err, "exit_code", None) is not None


def report(err: BaseException, *, label: str = "error") -> int:
    """Print ``err`` once per job, naming this rank; return its exit status. Never calls a collective.

    A user error (:class:`~tide_ds.errors.ConfigError` and the errors that carry an ``exit_code``) is one
    line ``tide-ds: <label> (rank R): <message>``; anything else is a bug and keeps its traceback. With
    several ranks the first failure is recorded in :func:`failure_file`: a rank whose error is the same
    message, or only the echo of another rank's death, prints nothing.
    """
    me, world = dist.rank(), dist.world_size()
    code = exit_code(err)
    user_error = _is_user_error(err)
    message = str(err) if user_error else f"{type(err).__name__}: {err}"
    if isinstance(err, KeyboardInterrupt):
        user_error, message = True, "interrupted (Ctrl-C); no checkpoint was written"
    earlier = _claim(f"{code}\n{me}\n{message}") if world > 1 else None
    where = f" (rank {me})"
    if earlier is None and is_peer_loss(err):
        text = (f"tide-ds: {label}{where}: lost contact with another rank, which crashed or was killed (its output, "
                f"above, says why): {message}\n")
    elif earlier is None:
        text = f"tide-ds: {label}{where}: {message}\n"
        if not user_error:
            text = "".join(traceback.format_exception(err)) + text
    elif is_peer_loss(err) or earlier.split("\n", 2)[-1] == message:
        text = ""  # the same failure, or its echo: already reported by the rank that recorded it
    else:
        text = f"tide-ds: {label}{where} (as well): {message}\n"
    if text:
        sys.stderr.write(text)
    return code


def fail(err: BaseException, *, label: str = "error") -> None:
    """Report ``err`` (once per job) and end this rank at once; never returns, never calls a collective."""
    code = report(err, label=label)
    dist.mark_failed()
    _leave(code)


def run(fn: Callable[..., Any], *args: Any, passthrough: tuple[type[BaseException], ...] = (), **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``; any exception but ``passthrough`` ends this rank at once through :func:`fail`."""
    try:
        return fn(*args, **kwargs)
    except passthrough:
        raise
    except SystemExit as err:
        if err.code in (0, None):
            raise
        fail(err)
    except BaseException as err:  # noqa: BLE001 -- every failure must end the job, not hang it
        fail(err)


def install(poll_s: float = 0.25) -> None:
    """Start the watchdog: when another rank of this job records a failure, exit with its status at once."""
    if dist.world_size() <= 1:
        return
    _clean_stale()
    path = failure_file()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            try:
                code, rank, _ = path.read_text().split("\n", 2)
            except (FileNotFoundError, ValueError):
                continue
            if int(rank) != dist.rank():
                dist.mark_failed()
                _leave(int(code))

    threading.Thread(target=watch, name="tide-ds-failfast", daemon=True).start()
