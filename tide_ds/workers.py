"""Worker pools that never inherit the trainer's signal handlers, and that say so when they cannot stop.

A ``fork``-ed worker inherits its parent's Python signal handlers. Inside ``train()`` those are the
preemption guard's (:mod:`tide_ds.trainer.preemption`), which only record SIGTERM/SIGINT/SIGUSR1. When a
``multiprocessing.Pool`` then ends with ``terminate()``, its SIGTERM merely sets a flag in a worker blocked
on the task queue's lock, and the parent waits in ``join()`` forever (0% CPU, no output).

Here the trainer's signals are blocked while the workers are forked (a signal that arrives meanwhile stays
pending, in the parent as in the children), and every worker starts by restoring the default handlers and
unblocking them, before it touches a task. The pool is closed with its sentinels (the workers exit on their
own) and joined with a deadline: workers still alive after it are named, killed, and the caller gets an error.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager

logger = logging.getLogger(__name__)

#: The signals the trainer handles (preemption, Ctrl-C); a worker must die of them, never record them.
TRAINER_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


def default_signal_handlers() -> None:
    """Restore the default action of the trainer's signals in this process and unblock them.

    SIGINT gets Python's own handler (KeyboardInterrupt), as in any fresh interpreter.
    """
    for sig in TRAINER_SIGNALS:
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, TRAINER_SIGNALS)


@contextmanager
def trainer_signals_blocked():
    """Block the trainer's signals in this thread while children are forked; pending ones arrive after."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, TRAINER_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _start_worker(initializer: Callable | None, initargs: tuple) -> None:
    default_signal_handlers()
    if initializer is not None:
        initializer(*initargs)


def start_pool(ctx, processes: int, initializer: Callable | None = None, initargs: tuple = ()):
    """``ctx.Pool(processes, initializer, initargs)`` whose workers start with default signal handlers."""
    with trainer_signals_blocked():
        return ctx.Pool(processes, _start_worker, (initializer, initargs))


class PoolStuck(RuntimeError):
    """Workers of a pool did not exit within the deadline (they were killed)."""


def stop_pool(pool, *, what: str, timeout: float = 60.0, clean: bool = True) -> None:
    """End ``pool`` without waiting forever.

    ``clean=True`` (all tasks done): close it, so that each worker exits on its sentinel; otherwise
    (an error) terminate it. Workers still alive ``timeout`` seconds later are named, killed with
    SIGKILL, and :class:`PoolStuck` is raised.
    """
    workers = list(getattr(pool, "_pool", []))  # multiprocessing.Pool keeps its Process objects here
    if clean:
        pool.close()
    else:  # SIGTERM each worker (default handlers: they die of it) without the pool's unbounded join
        for p in workers:
            if p.is_alive():
                p.terminate()
    deadline = time.monotonic() + timeout
    while any(p.is_alive() for p in workers) and time.monotonic() < deadline:
        time.sleep(0.02)
    stuck = [p.pid for p in workers if p.is_alive()]
    for p in workers:
        if p.is_alive():
            p.kill()
    if not clean or stuck:
        pool.terminate()  # stops the pool's helper threads; every worker is gone by now
    pool.join()
    if stuck:
        raise PoolStuck(
            f"{what}: worker process(es) {stuck} did not exit within {timeout:.0f} s of the pool's "
            f"{'close' if clean else 'terminate'}; killed them"
        )

