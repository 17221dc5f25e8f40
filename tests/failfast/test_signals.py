"""Item 6 of issue 16: Ctrl-C is handled like SIGTERM (checkpoint at the next step boundary); a second one exits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from tide_ds.trainer import preemption

ROOT = Path(__file__).resolve().parents[2]


def test_sigint_asks_for_a_checkpoint_like_sigterm() -> None:
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN under a non-interactive shell's background job
    guard = preemption.install("USR1,TERM")
    try:
        assert signal.SIGINT in guard.signals and signal.SIGTERM in guard.signals
        os.kill(os.getpid(), signal.SIGINT)  # recorded, no KeyboardInterrupt
        assert guard.received == signal.SIGINT and guard.should_stop()
        assert guard.agreed_signal_name() == "SIGINT"
    finally:
        guard.uninstall()
    assert signal.getsignal(signal.SIGINT) is before  # restored to what it was


def test_a_second_sigint_exits_at_once() -> None:
    script = textwrap.dedent("""
        import os, signal, time
        from tide_ds.trainer import preemption
        guard = preemption.install("USR1,TERM")
        os.kill(os.getpid(), signal.SIGINT)
        print("first recorded:", guard.received.name, flush=True)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
        print("still alive", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGINT, (proc.returncode, proc.stdout, proc.stderr)
    assert "first recorded: SIGINT" in proc.stdout and "still alive" not in proc.stdout
    assert "Ctrl-C: checkpoint at the next step boundary" in proc.stderr
    assert "second Ctrl-C: exiting now, without a checkpoint" in proc.stderr


def test_no_signals_means_no_sigint_handler_either() -> None:
    before = signal.getsignal(signal.SIGINT)
    guard = preemption.install("")
    assert guard.signals == [] and signal.getsignal(signal.SIGINT) is before


def test_deprecation_warnings_only_on_rank_0() -> None:
    script = textwrap.dedent("""
        import warnings
        from tide_ds.log import setup_logging
        setup_logging(rank=RANK)
        warnings.warn("old api", FutureWarning)
        print("done")
    """)
    for rank, expected in ((0, True), (1, False)):
        proc = subprocess.run([sys.executable, "-c", script.replace("RANK", str(rank))],
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
        assert proc.stdout.strip() == "done"
        assert ("FutureWarning: old api" in proc.stderr) == expected, (rank, proc.stderr)
